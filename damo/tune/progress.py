"""The sweep's live table: one row per trial (status, parameters, metric, iteration).

A Tune callback. On a terminal it redraws a rich table in place; elsewhere (a log file, `ray
job logs`) it prints one line per trial event instead. Tune pickles its callbacks with the
sweep state, so the console is dropped on pickling and made again when a resumed sweep starts.
"""

from __future__ import annotations

from ray.tune import Callback

SHORT = {"TERMINATED": "finished", "ERROR": "failed", "RUNNING": "running", "PENDING": "pending"}


def short_name(path: str) -> str:
    """`model.fuseformer.depth` -> `fuseformer.depth`: the last two parts say enough."""
    return ".".join(path.split(".")[-2:])


def trial_status(status: str, iterations: int, max_iterations: int) -> str:
    """Tune's status in the sweep's words: a trial that ended before its last epoch without
    an error was stopped by the scheduler."""
    if status == "TERMINATED" and iterations < max_iterations:
        return "stopped early"
    return SHORT.get(status, status.lower())


def epochs_done(result: dict | None) -> int:
    """The last stage's validated epochs a trial has reported: the epoch its latest report
    carries (Tune's own iteration also counts the stage-1 rung's report)."""
    from damo.tune.scheduler import STAGE1_KEY

    if not result or STAGE1_KEY in result:
        return 0
    return int(result.get("epoch", 0) or 0)


def format_value(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


class TrialTable(Callback):
    def __init__(self, params: list[str], metric: str, max_iterations: int, console=None):
        self.params = params
        self.metric = metric
        self.max_iterations = max_iterations
        self._console = console
        self._live = None

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_console"] = state["_live"] = None
        return state

    # ---- rendering -----------------------------------------------------------------------
    def table(self, trials):
        from rich.table import Table

        table = Table(title=f"trials ({self.metric})", title_justify="left")
        for column in ("trial", "status", *map(short_name, self.params), self.metric, "epoch"):
            table.add_column(column)
        for trial in trials:
            result = trial.last_result or {}
            iterations = epochs_done(result)
            metric = result.get(self.metric)
            table.add_row(
                trial.trial_id,
                trial_status(trial.status, iterations, self.max_iterations),
                *(format_value(trial.config.get(p, "")) for p in self.params),
                "" if metric is None else f"{metric:.3f}",
                f"{iterations}/{self.max_iterations}",
            )
        return table

    def show(self, trials, event: str | None = None) -> None:
        if self._live is not None:
            self._live.update(self.table(trials), refresh=True)
        elif event:
            self._console.print(event, highlight=False)

    # ---- Tune's hooks --------------------------------------------------------------------
    def setup(self, **info):
        from rich.console import Console
        from rich.live import Live

        self._console = self._console or Console()
        if self._console.is_terminal:
            self._live = Live(console=self._console, auto_refresh=False, transient=False)
            self._live.start()

    def on_trial_start(self, iteration, trials, trial, **info):
        self.show(trials, f"trial {trial.trial_id} started: {self.describe(trial)}")

    def on_trial_result(self, iteration, trials, trial, result, **info):
        from damo.tune.scheduler import STAGE1_KEY

        if STAGE1_KEY in result:
            loss = result[STAGE1_KEY]
            self.show(trials, f"trial {trial.trial_id} stage 1 val_loss {loss:.3f} (stage-1 rung)")
            return
        metric = result.get(self.metric)
        value = "" if metric is None else f" {self.metric} {metric:.3f}"
        epoch = epochs_done(result)
        self.show(trials, f"trial {trial.trial_id} epoch {epoch}/{self.max_iterations}{value}")

    def on_trial_complete(self, iteration, trials, trial, **info):
        from damo.tune.scheduler import STAGE1_KEY

        iterations = epochs_done(trial.last_result)
        status = trial_status("TERMINATED", iterations, self.max_iterations)
        when = (
            "at the stage-1 rung"
            if STAGE1_KEY in (trial.last_result or {})
            else f"after {iterations} epoch(s)"
        )
        self.show(trials, f"trial {trial.trial_id} {status} {when}")

    def on_trial_error(self, iteration, trials, trial, **info):
        self.show(trials, f"trial {trial.trial_id} failed (see its error in the results)")

    def on_experiment_end(self, trials, **info):
        if self._live is not None:
            self._live.update(self.table(trials), refresh=True)
            self._live.stop()
            self._live = None
        else:
            self._console.print(self.table(trials))

    def describe(self, trial) -> str:
        return ", ".join(
            f"{short_name(p)}={format_value(trial.config.get(p))}" for p in self.params
        )
