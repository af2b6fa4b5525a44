"""What a restore run reports: counts of files, units and images, speed, and the first failures."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from pipeline.noise import NOISE_BINS, noise_summary
from pipeline.restore.records import MAX_FAILURES_KEPT, UnitResult


RECENT_UNITS = 16  # per replica, for most_units_at_once: more than it ever has under way


@dataclass
class RestoreReport:
    output: str
    model_version: str
    files_total: int = 0
    files_restored: int = 0
    files_skipped: int = 0
    inputs_gone: list = field(default_factory=list)  # keys of inputs deleted since an earlier run, outputs left
    inputs_pruned: int = 0  # of those, how many this run removed (with prune): output, records and parts
    units_restored: int = 0  # units of work restored by this run
    units_skipped: int = 0  # units of unfinished files that an earlier run had finished
    images_total: int = 0  # rows in the units to restore this run
    images_ok: int = 0
    images_failed: int = 0
    images_failed_transient: int = 0  # of the failed, those whose reason can pass: a later run retries them
    images_retried: int = 0  # rows an earlier run failed for a reason that can pass, restored again by this run
    files_retried: int = 0  # done files whose such rows this run restored again
    retries_spent: int = 0  # rows failed for a reason that can pass in done files that used up their retries
    images_skipped: int = 0  # left untouched: too small, or less noisy than skip_below
    images_per_channel: int = 0  # colour images a gray model restored one channel at a time (a colour model would not)
    # estimated noise sigma of the rows this run read: count per whole sigma, 0-1, 1-2, ...,
    # the last bin holding everything above (pipeline/noise.py, `noise_summary`)
    noise_sigma_counts: list = field(default_factory=lambda: [0] * NOISE_BINS)
    megapixels: float = 0.0
    seconds: float = 0.0
    first_rows_seconds: float = 0.0  # start-up: planning, then a replica (or the head start) until the first rows
    executor: str = ""  # who ran the replicas: "in-process" or "ray" (executors.choose_executor)
    units_head_start: int = 0  # on Ray: units this process restored while Ray started (executors.HeadStart)
    rows_by_replica: dict = field(default_factory=dict)  # replica (host:pid) -> rows it restored
    most_units_at_once: int = 0  # the most units one replica had under way at one moment (units_per_worker)
    # seconds the replicas (all together) sat with nothing under way between one unit and
    # their next: a feed that keeps them waiting (the driver, Ray Data's scheduling)
    replica_idle_seconds: float = 0.0
    units_retried: list = field(default_factory=list)  # units restored again after their replica was lost
    stage_seconds: dict = field(default_factory=dict)  # busy seconds of all replicas per stage: read, decode, ...
    failures: list = field(default_factory=list)  # first few (image_id, reason)
    outputs: list = field(default_factory=list)

    def __post_init__(self):
        self._spans: dict[str, list[tuple[float, float]]] = {}  # replica -> (started, finished) of its units

    @property
    def megapixels_per_s(self) -> float:
        return self.megapixels / self.seconds if self.seconds else 0.0

    @property
    def replica_tail_seconds(self) -> float:
        """From the first replica's last unit's end to the last one's: work left queued at
        one replica while the others had none."""
        last = [max(finished for _, finished in spans) for spans in self._spans.values()]
        return max(last) - min(last) if last else 0.0

    @property
    def images_done(self) -> int:
        return self.images_ok + self.images_failed + self.images_skipped

    def add(self, result: UnitResult) -> None:
        """Count a unit a replica finished."""
        self.units_restored += 1
        self.images_ok += result.ok
        self.images_failed += result.failed
        self.images_failed_transient += result.transient
        self.images_skipped += result.skipped
        self.images_per_channel += result.per_channel
        self.noise_sigma_counts = [a + b for a, b in zip(self.noise_sigma_counts, result.noise_counts)]
        self.megapixels += result.megapixels
        self.rows_by_replica[result.replica] = self.rows_by_replica.get(result.replica, 0) + result.rows
        self._follow_replica(result)
        for stage, seconds in result.stages.items():
            self.stage_seconds[stage] = self.stage_seconds.get(stage, 0.0) + seconds
        self.failures += [tuple(failure) for failure in result.failures[: MAX_FAILURES_KEPT - len(self.failures)]]

    def _follow_replica(self, result: UnitResult) -> None:
        """`most_units_at_once` and `replica_idle_seconds`, from the replica's recent units: the
        most under way at any moment is the count at some unit's start (a replica's units
        finish in about the order they start, so the last few hold every unit that overlaps
        this one; a unit that outlasts more than RECENT_UNITS others may be counted short:
        statistics)."""
        spans = self._spans.setdefault(result.replica, [])
        if spans:  # the wait since the replica's last unit ended, if nothing ran in between
            self.replica_idle_seconds += max(0.0, result.started - max(finished for _, finished in spans))
        spans.append((result.started, result.finished))
        del spans[:-RECENT_UNITS]
        for moment, _ in spans:
            if result.started <= moment < result.finished:
                under_way = sum(1 for started, finished in spans if started <= moment < finished)
                self.most_units_at_once = max(self.most_units_at_once, under_way)

    def to_dict(self) -> dict:
        return {**asdict(self), "megapixels_per_s": self.megapixels_per_s,
                "replica_tail_seconds": self.replica_tail_seconds}


def format_report(report: dict) -> str:
    """What `resflow restore` prints without --json (`report`: RestoreReport.to_dict())."""
    can_pass = report.get("images_failed_transient")
    failed = f"{report['images_failed']} failed" + (f" ({can_pass} for a reason that can pass)" if can_pass else "")
    lines = [f"restored {report['files_restored']} file(s) ({report['files_skipped']} already done) in "
             f"{report['units_restored']} unit(s): {report['images_ok']} ok, {report['images_skipped']} skipped, "
             f"{failed}; "
             f"{report['megapixels']:.1f} MP in {report['seconds']:.1f} s = {report['megapixels_per_s']:.3f} MP/s "
             f"(first rows after {report['first_rows_seconds']:.1f} s"
             f"{', in this process' if report.get('executor') == 'in-process' else ''}"
             f"{head_start_note(report.get('units_head_start', 0))}); model {report['model_version']}",
             f"output: {report['output']}"]
    if report["inputs_gone"]:
        gone = report["inputs_gone"]
        lines.append(f"{len(gone)} input file(s) deleted since an earlier run: "
                     + (f"removed their outputs and records ({report['inputs_pruned']})" if report["inputs_pruned"]
                        else "their outputs and records remain; --prune removes them")
                     + f": {', '.join(gone[:5])}{' ...' if len(gone) > 5 else ''}")
    if report.get("files_retried"):
        lines.append(f"retried {report['images_retried']} row(s) of {report['files_retried']} done file(s) that an "
                     f"earlier run failed for a reason that can pass; their other rows were kept")
    if report.get("images_failed_transient"):
        lines.append(f"{report['images_failed_transient']} row(s) failed for a reason that can pass (a missing or "
                     f"unreadable file, storage, memory): the next run retries them")
    if report.get("retries_spent"):
        lines.append(f"{report['retries_spent']} row(s) failed for a reason that can pass and used up their retries; "
                     f"they stay failed (--retries, or --force to restore everything again)")
    noise = noise_summary(report["noise_sigma_counts"])
    if noise["images"]:
        lines.append(f"estimated noise sigma: median {noise['median']:.1f} over {noise['images']} images; "
                     + ", ".join(f"{label}: {count}" for label, count in noise["bins"]))
    if report.get("images_per_channel"):
        lines.append(f"note: model {report['model_version']} is gray: {report['images_per_channel']} colour image(s) "
                     f"were restored one channel at a time, which ignores the correlation between channels; a colour "
                     f"model (train --preset cpu-color) restores them jointly")
    if report.get("executor") == "ray" and report.get("replica_idle_seconds"):
        lines.append(f"{len(report['rows_by_replica'])} replica(s) waited {report['replica_idle_seconds']:.1f} s in all "
                     f"between their units (at most {report['most_units_at_once']} unit(s) at once in one replica)")
    for image_id, reason in report["failures"][:10]:
        lines.append(f"  failed: {image_id}: {reason}")
    return "\n".join(lines)


def head_start_note(units: int) -> str:
    return f"; {units} unit(s) restored in this process while Ray started" if units else ""
