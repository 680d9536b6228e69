#!/bin/sh
test -e "$1"
