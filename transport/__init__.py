"""How work travels: a small broker interface below both the control plane
(``dispatcher``) and the workers (``workers``), neither of which imports the other.

``interface``: the ``Transport`` (publish, publish a batch, publish delayed, consume with
prefetch, job queues with get/ack/give back/close, broadcast, queue state) and what both
adapters keep of its semantics; ``rabbitmq``: the real adapter (aio-pika); ``fastpath``:
the one module that reaches into aiormq; ``memory``: the in-process adapter for unit
tests; ``names``: every queue, exchange and file name, derived from ids; ``outage``: which
errors a service coming back cures; ``policy``: the retry backoff and its delay queues.
"""
