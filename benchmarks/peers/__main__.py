import asyncio

from benchmarks.peers.bench import main

asyncio.run(main())
