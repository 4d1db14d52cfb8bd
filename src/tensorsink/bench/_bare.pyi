from collections.abc import Sequence

def bare_loop(
    finals: list[str], temporaries: list[str], buffers: list[Sequence[object]], durability: int, threads: int
) -> None: ...
