"""Progress bars for iterative fits (terminal or notebook, via tqdm.auto)."""
from __future__ import annotations


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def set_postfix_str(self, s: str) -> None:
        pass

    def reset(self, total: int | None = None) -> None:
        pass

    def finish(self) -> None:
        pass

    def close(self) -> None:
        pass


def progress_bar(enabled: bool, total: int, desc: str):
    """A ``tqdm.auto`` bar when ``enabled`` is true, else an object that does nothing."""
    if not isinstance(enabled, bool):
        raise ValueError(f"progress={enabled!r} should be True or False")
    if not enabled:
        return _NoBar()
    from tqdm.auto import tqdm

    class _Bar(tqdm):
        def finish(self) -> None:
            """Converged early: the bar ends full, at the iterations actually run."""
            self.total = self.n
            self.refresh()

    return _Bar(total=total, desc=desc, leave=True)
