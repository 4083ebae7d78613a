"""benchmark/table.py: the submitit launcher runs a tiny 2-cell grid locally into a fresh directory and a second
invocation skips both cells; the rliable statistics on constructed rows give the values computed by hand; bad
input gets one error line and exit 2."""

import fcntl
import importlib.util
import json
import os
import shlex
import signal
import subprocess
import sys
import time
import types

import numpy as np
import pytest

from tests.helpers import MPE_TINY, REPO

spec = importlib.util.spec_from_file_location("table", os.path.join(REPO, "benchmark", "table.py"))
table = sys.modules["table"] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(table)


def row(task, quality, dec, seed, score, ret=None):
    ret = score if ret is None else ret
    return {
        "command": f"python oma_sd_mpe.py --env-id {task} --dataset {quality} --decomposition {dec} --seed {seed}",
        "task": task,
        "quality": quality,
        "decomposition": dec,
        "seed": seed,
        "beta": 0.1,
        "final_return": ret,
        "final_normalized_score": score,
        "eval_history": [
            {"step": 0, "return": 0.0, "normalized_score": 0.0},
            {"step": 10, "return": ret, "normalized_score": score},
        ],
    }


def rows_of(scores):
    """{(task, quality, decomposition): [score of seed 1, 2, ...]} -> rows."""
    return [row(t, q, d, s + 1, v) for (t, q, d), vs in scores.items() for s, v in enumerate(vs)]


def report(tmp_path, capsys, rows) -> str:
    """The text of `table.py --report-only` over `rows`, written as the out directory's one MPE results file."""
    with open(tmp_path / "mpe_x.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    table.main(table.Cfg(report_only=True, out=str(tmp_path), reps=50))
    return capsys.readouterr().out


def grid(tmp_path, *flags):
    extra = shlex.join([*MPE_TINY, "--exp-name", "tiny grid"])  # a quoted value must reach the script intact
    r = subprocess.run(
        [
            sys.executable,
            os.path.join(REPO, "benchmark", "table.py"),
            "--tasks",
            "simple_spread",
            "--qualities",
            "random",
            "--seeds",
            "1",
            "--out",
            "out",
            "--workdir",
            ".",
            "--reps",
            "50",
            f"--extra={extra}",
            *flags,
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMSD_DATA_DIR": str(tmp_path / "data")},
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    with open(tmp_path / "out" / "mpe.jsonl") as f:
        rows = [json.loads(line) for line in f]
    return r.stdout, rows, sorted(os.listdir(tmp_path / "runs")) if (tmp_path / "runs").exists() else []


def test_local_grid_runs_into_a_fresh_directory_and_resumes_by_skipping_its_cells(tmp_path):
    out, rows, runs = grid(tmp_path)
    assert "0 of the grid's 2 runs are already in" in out
    assert sorted(r["decomposition"] for r in rows) == ["independent", "sequential"]
    assert all(r["command"].endswith("--threads 1 --exp-name 'tiny grid'") for r in rows)
    made = [d for d in runs if d != "cache"]  # the run directories carry the quoted --exp-name
    assert len(made) == 2 and all(d.startswith("simple_spread__random__tiny grid__") for d in made)
    for name in ("learning_curves", "interval_estimates", "performance_profile"):
        assert os.path.getsize(tmp_path / "out" / "figures" / f"mpe_{name}.png") > 0

    again, rows_again, runs_again = grid(tmp_path)
    assert "2 of the grid's 2 runs are already in" in again and ">>" not in again
    assert rows_again == rows and runs_again == runs

    os.remove(tmp_path / "out" / "mpe.jsonl")  # rows lost, jobs' results still in out/submitit: nothing runs again
    third, rows_third, runs_third = grid(tmp_path)
    assert third.count("<< ") == 2 and ">>" not in third
    assert sorted(r["final_return"] for r in rows_third) == sorted(r["final_return"] for r in rows)
    assert runs_third == runs


def test_iqm_mean_and_probability_of_improvement_on_constructed_rows():
    seq = {
        ("simple_spread", "expert", "sequential"): [0, 10, 20, 1000],
        ("simple_spread", "mixture", "sequential"): [30, 40, 50, 60],
    }
    ind = {
        ("simple_spread", "expert", "independent"): [-1, -2, -3, -4],
        ("simple_spread", "mixture", "independent"): [-5, -6, -7, -8],
    }
    agg = table.aggregate(rows_of({**seq, **ind}), reps=200)
    assert agg["seeds"] == [1, 2, 3, 4] and len(agg["cells"]) == 2
    iqm, mean = agg["point"]["sequential"]
    assert iqm == pytest.approx(np.mean([20, 30, 40, 50])) and mean == pytest.approx(1210 / 8)
    assert agg["point"]["independent"][0] == pytest.approx(np.mean([-3, -4, -5, -6]))
    lo, hi = agg["interval"]["sequential"][:, 0]
    assert lo <= iqm <= hi
    assert agg["poi"] == 1.0 and agg["poi_ci"] == [1.0, 1.0]  # every sequential run beats every independent one
    multi = table.aggregate(rows_of({**seq, **ind}), reps=200, qualities=table.MULTIMODAL)
    assert multi["cells"] == [("simple_spread", "mixture")] and multi["poi"] == 1.0

    same = {(t, q, "independent"): v for (t, q, _), v in seq.items()}
    assert table.aggregate(rows_of({**seq, **same}), reps=200)["poi"] == 0.5

    const = table.aggregate(
        rows_of(
            {("simple_tag", "medium", "sequential"): [5, 5, 5], ("simple_tag", "medium", "independent"): [1, 2, 3]}
        ),
        reps=200,
    )
    assert const["point"]["sequential"][0] == 5 and list(const["interval"]["sequential"][:, 0]) == [5, 5]

    # a row with the paper's constants is aggregated on that scale (rows made before they recorded it used them)
    mixed = rows_of(
        {("simple_spread", "random", "sequential"): [1, 1], ("simple_spread", "random", "independent"): [2, 2]}
    )
    for r in mixed[:2]:
        r["final_paper_normalized_score"] = 7.0
    assert table.aggregate(mixed, reps=50)["point"]["sequential"][1] == 7.0


def test_vectorised_probability_of_improvement_is_rliables():
    from rliable import metrics

    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 4, (5, 6)).astype(float), rng.integers(0, 4, (3, 6)).astype(float)  # with ties
    assert table.probability_of_improvement(x, y) == pytest.approx(metrics.probability_of_improvement(x, y))


def test_score_matrices_keep_the_cells_and_seeds_both_decompositions_have():
    rows = rows_of(
        {
            ("simple_spread", "expert", "sequential"): [1, 2, 3],
            ("simple_spread", "expert", "independent"): [4, 5, 6],
            ("simple_spread", "medium", "sequential"): [7, 8],
            ("simple_spread", "medium", "independent"): [9, 10, 11],
            ("simple_tag", "expert", "sequential"): [12, 13, 14],
        }
    )  # no independent runs: left out
    rows.append(row("simple_spread", "expert", "sequential", 3, 99.0))  # a repeated seed: the first row counts
    m, cells, seeds = table.score_matrices(rows)
    assert cells == [("simple_spread", "expert"), ("simple_spread", "medium")] and seeds == [1, 2]
    assert m["sequential"].tolist() == [[1, 7], [2, 8]] and m["independent"].tolist() == [[4, 9], [5, 10]]


def test_behaviour_cloning_rows_join_the_table_as_their_own_column(tmp_path):
    out, rows, runs = grid(tmp_path, "--decompositions", "bc")
    assert [r["decomposition"] for r in rows] == ["bc"] and runs == []  # BC keeps no run directory
    cmd = "python benchmark/bc_reference.py --family mpe --env-id simple_spread --dataset random --seed 1"
    assert rows[0]["command"].startswith(cmd) and rows[0]["command"].endswith("--exp-name 'tiny grid'")
    assert rows[0]["normalization"]["expert"] > rows[0]["normalization"]["random"]
    assert [h["step"] for h in rows[0]["eval_history"]] == [0, 10, 20]  # the --extra steps reached BC
    assert "| behaviour cloning: return (normalized)" in out
    ret, score = rows[0]["final_return"], rows[0]["final_normalized_score"]
    assert f"| – | – | {ret:.1f} ({score:.1f}; paper's constants " in out  # no OMSD rows: their columns are empty
    assert "No cell has both decompositions" in out


def test_report_only_rebuilds_table_and_figures_with_sample_std(tmp_path, capsys):
    rows = rows_of(
        {("simple_spread", "expert", "sequential"): [1, 2, 3], ("simple_spread", "expert", "independent"): [1, 1, 4]}
    )
    text = report(tmp_path, capsys, rows)
    assert "ddof=1" in text and "| 2.0 ± 1.0 (2.0 ± 1.0) | 2.0 ± 1.7 (2.0 ± 1.7) | 3/3 | – |" in text
    assert "P(sequential > independent)" in text
    assert "| multimodal data: mixture, multimodal-2, multimodal-3, multimodal-3-soft | no such cells |" in text
    assert "Normalized with" not in text  # these rows do not say with what
    ref = {"random": 169.2, "expert": 548.8, "source": "the checkpoint"}
    for i, r in enumerate(rows):
        r.update(normalization=ref, final_paper_normalized_score=r["final_normalized_score"] + 10)
        r["total_seconds"] = 60.0 * (i + 2)  # 2, 3, ..., 7 minutes over the cell's six OMSD runs
    text = report(tmp_path, capsys, rows)
    assert "| 2.0 ± 1.0 (2.0 ± 1.0; paper's constants 12.0 ± 1.0) |" in text
    assert "| 3/3 | 2.0–7.0 | `python oma_sd_mpe.py" in text  # minutes per run, fewest to most
    assert "- simple_spread: R_random 169.2, R_expert 548.8 (the checkpoint)" in text
    del rows[1]["total_seconds"]  # a row that does not record its time is counted as such
    del rows[0]["normalization"]  # a row made before rows recorded their constants is said to be one
    text = report(tmp_path, capsys, rows)
    assert "- simple_spread: some rows do not record their constants" in text
    assert "| 3/3 | 2.0–7.0 (5 of 6 runs) |" in text
    assert sorted(os.listdir(tmp_path / "figures")) == [
        "mpe_interval_estimates.png",
        "mpe_learning_curves.png",
        "mpe_performance_profile.png",
    ]


def test_marl_eval_json_follows_its_documented_schema(tmp_path, capsys):
    """<out>/<family>_marl_eval.json: environment -> task -> algorithm -> run -> step_k {step_count, metric: [values
    per evaluation episode]} and absolute_metrics (marl-eval's README, "Data Structure for Raw Experiment data")."""
    rows = rows_of({("Hopper-3x1", "expert", "sequential"): [1, 2], ("Hopper-3x1", "expert", "bc"): [3, 4]})
    ref = {"random": 0.0, "expert": 200.0, "source": "test"}
    for r in rows:
        r["normalization"] = ref
        final = {"step": 10, "return": r["final_return"], "normalized_score": r["final_return"] / 2}
        r["eval_history"] = [{"step": 0, "return": 1.0, "normalized_score": 0.5}, final]
    rows[0]["eval_history"][1]["episode_returns"] = [0.0, 2.0]  # MaMuJoCo rows keep every episode's return
    with open(tmp_path / "mamujoco.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    table.main(table.Cfg(family="mamujoco", report_only=True, out=str(tmp_path), reps=50))
    assert "marl-eval's raw-data format" in capsys.readouterr().out
    data = json.loads((tmp_path / "mamujoco_marl_eval.json").read_text())
    assert list(data) == ["mamujoco"] and list(data["mamujoco"]) == ["Hopper-3x1_expert"]
    algos = data["mamujoco"]["Hopper-3x1_expert"]
    assert sorted(algos) == ["bc", "omsd_sequential"] and sorted(algos["bc"]) == ["run_1", "run_2"]
    for algo in algos.values():
        for run in algo.values():
            assert sorted(run) == ["absolute_metrics", "step_0", "step_1"]
            for step in ("step_0", "step_1"):
                assert isinstance(run[step]["step_count"], int)
                for metric in ("return", "normalized_score"):
                    assert run[step][metric] and all(isinstance(x, float) for x in run[step][metric])
            assert run["absolute_metrics"]["return"] == run["step_1"]["return"]  # the final evaluation
    first = algos["omsd_sequential"]["run_1"]
    assert first["step_1"]["return"] == [0.0, 2.0] and first["step_1"]["normalized_score"] == [0.0, 1.0]
    assert algos["bc"]["run_1"]["absolute_metrics"]["return"] == [rows[2]["final_return"]]  # a mean as one value


def bad(capsys, **kw):
    with pytest.raises(SystemExit) as e:
        table.main(table.Cfg(**kw))
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and err[0].startswith("error:"), err
    return err[0]


def test_bad_input_gets_one_error_line_and_exit_2(tmp_path, capsys, monkeypatch):
    (tmp_path / "file").write_text("")
    assert "--family" in bad(capsys, family="atari", out=str(tmp_path))
    assert "--launcher" in bad(capsys, launcher="pbs", out=str(tmp_path))
    assert "is a file" in bad(capsys, out=str(tmp_path / "file"))
    assert "--out" in bad(capsys)  # a grid needs its own results directory
    assert "does not exist" in bad(capsys, report_only=True, out=str(tmp_path / "missing"))
    assert "unknown task" in bad(capsys, tasks=("simple_pong",), out=str(tmp_path))
    assert "unknown quality" in bad(capsys, qualities=("great",), out=str(tmp_path))
    assert "--extra" in bad(capsys, extra="--exp-name 'unclosed", out=str(tmp_path))
    with open(tmp_path / "mpe.jsonl", "a") as held:  # another grid is writing this directory's rows
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert "another benchmark/table.py" in bad(capsys, out=str(tmp_path))
    monkeypatch.setenv("PATH", str(tmp_path))  # no srun
    assert "srun" in bad(capsys, launcher="slurm", out=str(tmp_path))


def test_slurm_job_array_carries_the_options(tmp_path, monkeypatch):
    srun = tmp_path / "srun"  # submitit's SLURM executor only checks that srun exists
    srun.write_text("#!/bin/sh\nexit 1\n")
    srun.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    cfg = table.Cfg(launcher="slurm", slurm_partition="cpu", slurm_time=90, slurm_cpus=2, slurm_array_parallelism=16)
    ex = table.make_executor(cfg, str(tmp_path / "submitit"))._executor
    ex.parameters["map_count"] = 90  # what executor.batch() sets for a 90-run table
    sbatch = ex._make_submission_file_text("CMD", "uid")
    for line in ("--array=0-89%16", "--partition=cpu", "--time=90", "--cpus-per-task=2", "--signal=USR2@90"):
        assert f"#SBATCH {line}\n" in sbatch


def test_a_kill_during_a_submission_cancels_that_job(tmp_path, monkeypatch):
    """A job's process starts inside executor.submit, before the grid holds it: a SIGTERM arriving there waits until
    the submission ends, so that job is cancelled with the others (submitit's jobs ignore SIGTERM)."""
    cancelled = []

    class Job:
        job_id, paths = "1", types.SimpleNamespace(stderr="log")

        def done(self):
            return False

        def cancel(self, check=True):
            cancelled.append(self)

    class Executor:
        def submit(self, cell):
            os.kill(os.getpid(), signal.SIGTERM)  # handled at once, inside the submission
            return Job()

    monkeypatch.setattr(table, "make_executor", lambda cfg, folder: Executor())
    handlers = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    cfg = table.Cfg(tasks=("simple_spread",), qualities=("random",), decompositions=("sequential",), seeds=(1,))
    try:
        with pytest.raises(SystemExit) as e:
            table.run_grid(cfg, str(tmp_path))
    finally:
        signal.signal(signal.SIGTERM, handlers[0])
        signal.signal(signal.SIGINT, handlers[1])
        table.SUBMITTING.update(now=False, interrupted=False)
    assert e.value.code == 130 and len(cancelled) == 1


def test_sigterm_stops_the_grid_and_its_local_jobs(tmp_path):
    """`kill` of the grid cancels its running jobs, as Ctrl-C does (a job left running would hold its run's lock)."""
    cmd = [sys.executable, os.path.join(REPO, "benchmark", "table.py"), "--tasks", "simple_spread", "--qualities"]
    cmd += ["random", "--seeds", "1", "--out", "out", "--workdir", ".", "--parallel", "1"]
    cmd += [f"--extra={shlex.join([*MPE_TINY, '--diffusion-steps', '100000'])}"]  # a run that outlasts the test
    env = {**os.environ, "OMSD_DATA_DIR": str(tmp_path / "data")}
    p = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in p.stdout:  # wait until the first job is submitted
        if line.startswith(">> "):
            break
    folder = str(tmp_path / "out" / "submitit")

    def jobs():  # processes of this grid's jobs
        out = subprocess.run(["pgrep", "-f", folder], capture_output=True, text=True).stdout
        return [int(x) for x in out.split()]

    for _ in range(100):
        if jobs():
            break
        time.sleep(0.1)
    assert jobs(), "the job did not start"
    p.terminate()
    _, err = p.communicate(timeout=60)
    assert p.returncode == 130 and "interrupted with 2 cells unfinished" in err, err[-2000:]
    assert "Traceback" not in err  # the jobs' controllers write theirs to submitit/controllers.log
    for _ in range(100):
        if not jobs():
            break
        time.sleep(0.1)
    assert not jobs()


def test_report_names_only_the_multimodal_qualities_it_has(tmp_path, capsys):
    rows = rows_of(
        {
            ("simple_spread", "expert", "sequential"): [1, 2, 3],
            ("simple_spread", "expert", "independent"): [1, 1, 4],
            ("simple_spread", "mixture", "sequential"): [3, 4, 5],
            ("simple_spread", "mixture", "independent"): [1, 2, 3],
        }
    )
    text = report(tmp_path, capsys, rows)
    assert "| all (2) |" in text
    assert "| multimodal data: mixture (1) | 0.94 [" in text  # 8 of 9 seed pairs better, one tie


def test_report_states_the_protocol_and_sequential_against_behaviour_cloning(tmp_path, capsys):
    rows = rows_of(
        {
            ("simple_spread", "expert", "sequential"): [5, 6, 7],
            ("simple_spread", "expert", "independent"): [1, 2, 3],
            ("simple_spread", "expert", "bc"): [6, 6, 1],
            ("simple_spread", "mixture", "sequential"): [1, 2, 3],
            ("simple_spread", "mixture", "independent"): [1, 2, 3],
        }
    )
    for r in rows[:6]:
        r["final_eval_episodes"] = 32
    text = report(tmp_path, capsys, rows)
    # expert: sequential beats BC in 5 of 9 seed pairs and ties two (6 / 9); mixture has no BC rows
    assert "| all (2) | 0.75 [" in text and "| 0.67 [" in text and "(1 cells) |" in text
    assert "| multimodal data: mixture (1) | 0.50 [" in text and "| no BC rows |" in text
    assert "3 seeds (1, 2, 3); final evaluation over 32 episodes (6 rows); not recorded (9 rows" in text


def test_local_jobs_side_by_side_get_one_thread_each_and_a_commands_own_threads_win():
    import oma_sd_mpe as om

    def threads(cmd, n):
        cell = table.Cell("mpe", "simple_spread", "expert", "sequential", 1, cmd, REPO, n)
        return om.cli_args(cell.script_argv()).threads, cell.command

    assert threads("python oma_sd_mpe.py --seed 1", 1) == (1, "python oma_sd_mpe.py --seed 1")  # row's command as is
    assert threads("python oma_sd_mpe.py --seed 1 --threads 2", 1)[0] == 2
    assert threads("python oma_sd_mpe.py --seed 1", 0)[0] == 0  # one job at a time / SLURM: the script's default
