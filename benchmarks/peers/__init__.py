"""The peers a user would pick instead of the dispatcher, benchmarked on the same RabbitMQ:
``python -m benchmarks.peers`` (bench.py says what each setup is)."""
