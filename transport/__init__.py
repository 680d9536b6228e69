"""How work travels: RabbitMQ behind one small interface, below both the control plane
(``dispatcher``) and the workers (``workers``), neither of which imports the other.

``names``: every queue, exchange and file name, derived from ids; ``outage``: which errors
a service coming back cures; ``policy``: the retry backoff and its delay queues;
``rabbitmq``: the broker; ``fastpath``: the one module that reaches into aiormq.
"""
