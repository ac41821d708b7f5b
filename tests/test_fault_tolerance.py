"""Fault-tolerant mode under real ``mpirun --with-ft ulfm``: ranks killed with SIGKILL during each kind
of op, the survivors get gossip.RankFailure, recover and go on, checked against NumPy
(tests/mpi_scripts/fault_tolerance.py); every optimizer carrying on after the recovery
(tests/mpi_scripts/fault_tolerance_optimizers.py); and the mode's settings and launcher flags."""

import json
import re
import sys
import textwrap

import pytest

from gossip.plan.schedule import NoCommunication, PeriodicGlobalAverage
from gossip.settings import Settings
from gossip.tools.launch import fault_tolerant_flags, parse_arguments
from tests.mpi_harness import TESTS, emulation_unavailable, run_job

JOB = TESTS / "mpi_scripts" / "fault_tolerance.py"
BOUND = 120.0  # seconds per job: about 10 s on 2 cores; a hang at any point ends the test well before this

# case (phase) -> origins of the ranks that survive to the end, ranks of each recovery's ``failed``
CASES = {
    ("static", ""): ([0, 1, 3], [[2]]),
    ("static", "progress-thread"): ([0, 1, 3], [[2]]),  # GOSSIP_PROGRESS_THREAD=1: stopped and restarted
    ("dynamic", ""): ([0, 1, 3], [[2]]),
    ("hierarchical", ""): ([0, 1, 3], [[2]]),  # rank 2 leads the second pretended machine
    ("allreduce", ""): ([0, 1, 3], [[2]]),
    ("window", ""): ([0, 1, 3], [[2]]),
    ("two_failures", ""): ([0, 2], [[1], [2]]),  # the second failure is old rank 3, rank 2 of the 3 survivors
    ("simultaneous", ""): ([0, 3], None),  # one recovery of both, or one each: as the notices arrive
    ("during_recovery", "in-shrink"): ([0, 1], [[2, 3]]),
    ("during_recovery", "in-recover"): ([0, 1], None),
    ("topology_errors", ""): ([0, 1], [[2], [2]]),
}


#: Open MPI 5.0.11 crashing inside its own failure handling: a rank that dies while the survivors
#: shrink makes ``ompi_comm_revoke_local`` dereference a communicator being torn down (a segmentation
#: fault in libmpi, about one run in six of the ``during_recovery`` cases, before and after this
#: library's changes; never in our code).
MPI_CRASH = re.compile(r"Segmentation fault[\s\S]*libmpi\.so[^\n]*\(ompi_comm_revoke_local")


def run_case(case: str, phase: str, tmp_path) -> list[dict]:
    """The survivors' reports of one job of 4 ranks started as ``gossiprun --fault-tolerant`` would; a
    job that hit :data:`MPI_CRASH` is run once more (a second crash fails the test)."""
    command = [*fault_tolerant_flags(), sys.executable, str(JOB), case, str(tmp_path), *([phase] if phase else [])]
    env = {"GOSSIP_PROGRESS_THREAD": "1"} if phase == "progress-thread" else None
    done = run_job(4, command, BOUND, env=env, what=f"the fault-tolerant job {case} {phase}")
    if MPI_CRASH.search(done.stdout):
        print(f"Open MPI crashed in ompi_comm_revoke_local during {case} {phase}; running the job again")
        done = run_job(4, command, BOUND, env=env, what=f"the fault-tolerant job {case} {phase}")
    return reports_of(done.returncode, done.stdout)


def run_emulated(case: str, tmp_path) -> list[dict]:
    """As :func:`run_case`, on two emulated machines of two ranks (``gossiprun --emulate 2x2 --fault-tolerant``)."""
    done = run_job(4, ["--fault-tolerant", sys.executable, str(JOB), case, str(tmp_path)], BOUND,
                   what=f"the emulated fault-tolerant job {case}", emulated=("2x2", "1gbit"))
    return reports_of(done.returncode, done.stdout)


def reports_of(returncode: int, output: str) -> list[dict]:
    reports = [json.loads(line[len("RESULT "):]) for line in output.splitlines() if line.startswith("RESULT ")]
    assert returncode == 0 and reports, output[-6000:]
    return sorted(reports, key=lambda r: r["origin"])


@pytest.mark.mpi
@pytest.mark.parametrize("case,phase", list(CASES), ids=[f"{c}-{p}" if p else c for c, p in CASES])
def test_survivors_recover_and_continue(case, phase, tmp_path):
    survivors, failures = CASES[case, phase]
    reports = run_case(case, phase, tmp_path)
    assert [r["origin"] for r in reports] == survivors, reports
    for report in reports:
        assert report["size"] == len(survivors) and report["rank"] == survivors.index(report["origin"]), report
        assert report["checked"] >= 6, report  # ops on the survivors, each against NumPy
        if failures is not None:
            assert [r["failed"] for r in report["recoveries"]] == failures, report
        assert all(r["seconds"] < 5.0 for r in report["recoveries"]), report  # the target: under 5 s
        assert all(d is not None and d < 10.0 for d in report["detect_s"]), report
    if case == "dynamic":  # a handle in flight when rank 2 died raised, and raises again after recovery
        assert any(report.get("abandoned_handles") for report in reports), reports
    if case == "hierarchical":  # the old rank 3 leads its machine now
        assert reports[0]["machines"] == [[0, 0], [0, 1], [1, 0]], reports[0]
    if case == "during_recovery" and phase == "in-recover":  # either caught by the agreement, or right after
        assert reports[0]["recoveries"][-1]["new_size"] == 2, reports[0]
    if case == "topology_errors":
        assert "hypercube" in reports[0]["hypercube_error"] and "3 ranks" in reports[0]["hypercube_error"]
        assert "set as a graph on 3 nodes" in reports[0]["graph_error"]
    seconds = [r["seconds"] for report in reports for r in report["recoveries"]]
    detect = [d for report in reports for d in report["detect_s"]]
    print(f"\n{case} {phase}: detection {min(detect) * 1e3:.0f}-{max(detect) * 1e3:.0f} ms, recovery "
          f"{min(seconds) * 1e3:.1f}-{max(seconds) * 1e3:.1f} ms, attempts "
          f"{[r['attempts'] for r in reports[0]['recoveries']]}")


OPTIMIZERS = TESTS / "mpi_scripts" / "fault_tolerance_optimizers.py"
OPTIMIZERS_BOUND = 300.0  # seconds: about 40 s on 2 quiet cores (mostly starting torch on 4 ranks)


@pytest.mark.mpi
def test_every_synchronous_optimizer_carries_on_after_recovery(tmp_path):
    """Every synchronous registry algorithm (static and time-varying topologies, hierarchical, Gossip-PGA,
    the scheduler, 8 MB messages) in one job: rank 2 dies; after gossip.recover() each optimizer's steps
    follow its equation on the survivors' W (checked in NumPy, step by step), push-sum mass sums to 3,
    trackers sum to the gradients, outer states and allreduce models agree, the loss falls to near the
    survivors' minimum and the models agree; adpsgd and a OnePeer graph family raise a clear error
    (tests/mpi_scripts/fault_tolerance_optimizers.py)."""
    command = [*fault_tolerant_flags(), sys.executable, str(OPTIMIZERS), str(tmp_path)]
    done = run_job(4, command, OPTIMIZERS_BOUND, what="the fault-tolerant optimizers job")
    reports = reports_of(done.returncode, done.stdout)
    assert [r["origin"] for r in reports] == [0, 1, 3], reports
    synchronous = {"dsgd", "dsgd-awc", "dmsgd", "decentlam", "awc-dmsgd", "da-dmsgd", "qg-dmsgd", "d2", "sgp",
                   "gradient-tracking", "pmsgd", "local-sgd", "mavg", "slowmo", "bmuf", "cr-psgd", "cr-psgd-catalyst"}
    variants = {"dsgd/dynamic", "sgp/dynamic", "gradient-tracking/dynamic", "dsgd/hierarchical", "dsgd/scheduler",
                "dsgd/dynamic+pga", "dsgd-awc/static/8MB", "sgp/dynamic/8MB", "pmsgd/8MB", "adpsgd", "dsgd/inner-outer",
                "sgp/given-graph", "dsgd/one-peer-ring", "sgp/hub"}
    for report in reports:
        assert report["size"] == 3 and report["recovery_s"] < 5.0, report
        assert report["checked"] > 1000, report["checked"]  # each step checked, several quantities each
        cases = report["cases"]
        assert synchronous <= {label.split("/")[0] for label in cases} and variants <= set(cases), sorted(cases)
        for label, trace in cases.items():
            if "loss_gap" in trace:
                assert trace["loss_gap"] < trace["loss_gap_at_recovery"], (label, trace)
    assert any(abs(r["cases"]["sgp/hub"]["mass_before"] - 1) > 0.1 for r in reports), reports  # renormalised
    outer = reports[0]["cases"]["slowmo(dsgd)/dynamic"]  # which survivors completed its step at the failure
    print(f"\nslowmo(dsgd): step counts at the failure {outer['steps_before']}, round ended in the recovery: "
          f"{outer['round_ended_in_recovery']}", end="")
    traces = reports[0]["cases"].items()
    gaps = {label: t["loss_gap"] / t["loss_gap_at_recovery"] for label, t in traces if "loss_gap" in t}
    worst = max(gaps, key=gaps.get)
    print(f"\n{reports[0]['checked']} checks per survivor; recovery {max(r['recovery_s'] for r in reports) * 1e3:.0f} "
          f"ms; worst loss gap left (of the gap at the recovery): {worst} {gaps[worst]:.3g}")


@pytest.mark.parametrize("every,warmup", [(3, 0), (4, 2), (1, 0), (None, 3), (5, 7)])
def test_periodic_average_counts_the_averages_before_a_step(every, warmup):
    """What an outer loop's recovery compares its rounds with (PeriodicGlobalAverage.averages_before)."""
    schedule = PeriodicGlobalAverage(NoCommunication(), every, warmup)
    for step in range(40):
        assert schedule.averages_before(step) == sum(schedule.averages(k) for k in range(step)), (every, warmup, step)


@pytest.mark.mpi
@pytest.mark.emulated
@pytest.mark.parametrize("case", ["static", "hierarchical"])
def test_across_emulated_machines(case, tmp_path):
    """Two machines of two ranks: rank 2 (the second machine's leader) dies; windows are refused (checked
    on every rank at the start of the static case: the window case's own job on one machine only)."""
    reason = emulation_unavailable()
    if reason:
        pytest.skip(reason)
    reports = run_emulated(case, tmp_path)
    assert [r["origin"] for r in reports] == [0, 1, 3], reports
    if case == "static":
        assert all(r.get("window_refused") for r in reports), reports
    for report in reports:
        assert report["checked"] >= 6 and [r["failed"] for r in report["recoveries"]] == [[2]], report
        assert all(r["seconds"] < 5.0 for r in report["recoveries"]), report
    if case == "hierarchical":
        assert reports[0]["machines"] == [[0, 0], [0, 1], [1, 0]], reports[0]


@pytest.mark.mpi
def test_every_blocking_point_raises_rank_failure_without_recovery(tmp_path):
    reports = run_case("blocking_points", "", tmp_path)
    assert [r["origin"] for r in reports] == [0, 1, 3], reports
    expected = sorted(["set_topology", "barrier", "allreduce", "neighbor_allreduce", "neighbor_allreduce_async",
                       "hierarchical", "Window", "shutdown"])
    assert all(r["raised"] == expected for r in reports), reports


@pytest.mark.mpi
def test_fault_tolerant_mode_needs_ulfm_and_recover_needs_the_mode():
    code = textwrap.dedent("""
        import gossip
        try:
            gossip.init(fault_tolerant=True)
            raise SystemExit("fault-tolerant mode started without ULFM")
        except gossip.GossipError as error:
            assert "gossiprun --fault-tolerant" in str(error), error
        gossip.init()
        try:
            gossip.recover()
            raise SystemExit("recover() ran outside fault-tolerant mode")
        except gossip.GossipError as error:
            assert "needs fault-tolerant mode" in str(error), error
        assert not gossip.settings().fault_tolerant
        gossip.shutdown()
        print("CHECKED", flush=True)
    """)
    done = run_job(2, [sys.executable, "-c", code], 60.0, what="the job without ULFM")
    assert done.returncode == 0 and done.stdout.count("CHECKED") == 2, done.stdout[-4000:]


def test_settings_and_launcher_flags():
    assert Settings.resolve({}).fault_tolerant is False
    ft = Settings.resolve({"GOSSIP_FAULT_TOLERANT": "1"})
    assert ft.fault_tolerant and not ft.shared_memory  # node shared memory is off in the mode
    assert Settings.resolve({}, fault_tolerant=True, shared_memory=False).fault_tolerant
    with pytest.raises(ValueError, match="shared_memory and fault_tolerant"):
        Settings.resolve({"GOSSIP_SHARED_MEMORY": "1"}, fault_tolerant=True)
    with pytest.raises(ValueError, match="GOSSIP_FAULT_TOLERANT"):
        Settings.resolve({"GOSSIP_FAULT_TOLERANT": "yes"})
    request = parse_arguments(["--fault-tolerant", "-np", "4", "python", "train.py"])
    assert request.fault_tolerant and request.np == 4 and request.command == ["python", "train.py"]
    assert request.mpirun_flags[:2] == ["--with-ft", "ulfm"] and "tcp,self" in request.mpirun_flags
    own = parse_arguments(["-np", "2", "--fault-tolerant", "--mca", "btl", "self,tcp", "x"])
    assert own.mpirun_flags.count("btl") == 1 and own.mpirun_flags[-3:] == ["--mca", "btl", "self,tcp"]
    assert "--with-ft" not in parse_arguments(["-np", "2", "x"]).mpirun_flags
