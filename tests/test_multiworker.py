"""train_encoder(strategy="multiworker"): two worker processes on 127.0.0.1 train one encoder."""
import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from cifl_tf import CIFLEncoder, load_encoder, save_encoder

pytestmark = pytest.mark.integration  # worker processes of their own

REPO = pathlib.Path(__file__).resolve().parents[1]
IMAGE = np.random.default_rng(0).uniform(size=(1, 32, 32, 1)).astype(np.float32)

# Each worker prints its encoder's features of IMAGE, to compare the workers' weights.
WORKER = """
import json, sys
import numpy as np
import cifl_tf
encoder = cifl_tf.train_encoder(shape=(32, 32), steps=4, steps_per_epoch=2, batch_size=2, channels=4, features=8,
                                max_offset=4, seed=0, out_dir=sys.argv[1], resume=sys.argv[2:] == ["resume"],
                                strategy="multiworker", verbose=2)
image = np.random.default_rng(0).uniform(size=(1, 32, 32, 1)).astype(np.float32)
print(json.dumps(encoder(image).numpy().tolist()))
"""


def free_ports(count):
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def start_workers(out_dir, *args, count=2, temporary=None):
    """Starts the `count` worker processes of one cluster on 127.0.0.1 (worker 0 is the chief), with `temporary`
    their TMPDIR if given."""
    cluster = {"worker": [f"127.0.0.1:{port}" for port in free_ports(count)]}
    workers = []
    for index in range(count):
        environ = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
                   **({"TMPDIR": str(temporary)} if temporary else {}),
                   "TF_CPP_MIN_LOG_LEVEL": "3",
                   "TF_CONFIG": json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}})}
        workers.append(subprocess.Popen([sys.executable, "-c", WORKER, str(out_dir), *args], env=environ,
                                        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    return workers


def run_workers(out_dir, *args, count=2, temporary=None):
    """Runs the workers of one cluster to their end; returns each one's printed features."""
    workers = start_workers(out_dir, *args, count=count, temporary=temporary)
    outputs = [worker.communicate(timeout=600) for worker in workers]
    errors = "\n".join(f"worker {i}: {err[-2000:]}" for i, (_, err) in enumerate(outputs))
    assert [worker.returncode for worker in workers] == [0] * count, errors
    # only the chief (worker 0) wrote the run, and says so
    assert [f"encoder written to {out_dir}" in out for out, _ in outputs] == [True] + [False] * (count - 1)
    return [np.array(json.loads(out.strip().splitlines()[-1])) for out, _ in outputs]


def test_two_workers_train_one_encoder(tmp_path):
    chief, other = run_workers(tmp_path / "run")
    np.testing.assert_array_equal(chief, other)
    np.testing.assert_allclose(load_encoder(str(tmp_path / "run"))(IMAGE), chief, atol=1e-6)
    assert sorted(os.listdir(tmp_path / "run")) == ["backup", "encoder.json", "encoder.weights.h5", "log.csv",
                                                     "result.json", "settings.json", "tensorboard"]
    # the finished folder again: the chief refuses it, and the other worker stops too instead of failing in
    # collective ops that the chief has left
    outputs = [worker.communicate(timeout=300) for worker in start_workers(tmp_path / "run")]
    assert "result.json: already exists, the run in" in outputs[0][1], outputs[0][1][-2000:]
    assert f"ValueError: {tmp_path / 'run'}: the chief worker refused this run folder (its error says why)" in \
        outputs[1][1], \
        outputs[1][1][-2000:]


def one_worker_cluster():
    return json.dumps({"cluster": {"worker": [f"127.0.0.1:{free_ports(1)[0]}"]}, "task": {"type": "worker",
                                                                                          "index": 0}})


def test_sigterm_stops_a_multiworker_run_with_status_143(tmp_path):
    """TensorFlow's runtime replaces the SIGTERM handler when the strategy starts; the run then trained on."""
    process = subprocess.Popen(
        [sys.executable, "-m", "cifl_tf.cli", "train-encoder", "--strategy", "multiworker", "--shape", "32x32",
         "--steps", "4000", "--steps-per-epoch", "2", "--batch-size", "2", "--channels", "4", "--features", "8",
         "--max-offset", "4", "--out", str(tmp_path / "run")],
        env={**os.environ, "TF_CONFIG": one_worker_cluster(), "TF_CPP_MIN_LOG_LEVEL": "3"}, cwd=REPO,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    while process.poll() is None and not (tmp_path / "run" / "backup" / "checkpoint").is_file():
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=120) == 128 + signal.SIGTERM, process.stderr.read()[-2000:]
    assert not (tmp_path / "run" / "result.json").exists()


def test_a_multiworker_run_starts_from_an_init_encoder(tmp_path):
    """Reading the init encoder ran TF operations before the strategy, which must come first."""
    init = CIFLEncoder(channels=4, features=8)
    init(IMAGE)
    save_encoder(init, str(tmp_path / "init.weights.h5"))
    result = subprocess.run(
        [sys.executable, "-m", "cifl_tf.cli", "train-encoder", "--strategy", "multiworker", "--shape", "32x32",
         "--steps", "2", "--batch-size", "2", "--channels", "4", "--features", "8", "--max-offset", "4",
         "--init", str(tmp_path / "init.weights.h5"), "--out", str(tmp_path / "run")],
        env={**os.environ, "TF_CONFIG": one_worker_cluster(), "TF_CPP_MIN_LOG_LEVEL": "3"}, cwd=REPO,
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "run" / "result.json").is_file()


def test_a_worker_whose_port_is_taken_stops_in_one_line_and_writes_nothing(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        config = {"cluster": {"worker": [f"127.0.0.1:{taken.getsockname()[1]}"]}, "task": {"type": "worker",
                                                                                          "index": 0}}
        result = subprocess.run([sys.executable, "-m", "cifl_tf.cli", "train-encoder", "--strategy", "multiworker",
                                 "--shape", "32x32", "--steps", "2", "--out", str(tmp_path / "run")],
                                env={**os.environ, "TF_CONFIG": json.dumps(config), "TF_CPP_MIN_LOG_LEVEL": "3"},
                                cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.splitlines()[-1].startswith(
        "cifl train-encoder: error: strategy 'multiworker': this worker's server did not start ("), result.stderr
    assert "is its port in use" in result.stderr and not (tmp_path / "run").exists()


def test_multiworker_needs_a_cluster(monkeypatch):
    from cifl_tf.training import multi_worker_strategy
    for name in ("TF_CONFIG", "SLURM_STEP_NUM_TASKS"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ValueError, match="strategy 'multiworker' needs a cluster: set TF_CONFIG"):
        multi_worker_strategy()


@pytest.mark.parametrize("config, message", [
    ("not json", "TF_CONFIG is not a JSON object, got 'not json'"),
    ("[]", "TF_CONFIG is not a JSON object, got '\\[\\]'"),
    ("{}", "TF_CONFIG names no cluster of workers, got '{}'"),
    ("", "TF_CONFIG names no cluster of workers, got ''"),
    ('{"cluster": {}}', "TF_CONFIG names no cluster of workers"),
])
def test_multiworker_refuses_a_tf_config_without_a_cluster(monkeypatch, config, message):
    """TensorFlow trained alone on such a TF_CONFIG, or gave the JSON parser's message without naming it."""
    from cifl_tf.training import multi_worker_strategy
    monkeypatch.setenv("TF_CONFIG", config)
    with pytest.raises(ValueError, match=f"strategy 'multiworker': {message}"):
        multi_worker_strategy()


@pytest.mark.slow
def test_resume_after_a_worker_dies(tmp_path):
    """...and the killed worker's checkpoints are gone once its task has run again, from the run folder and the
    temporary folder alike."""
    through = run_workers(tmp_path / "through")[0]
    run, temporary = tmp_path / "run", tmp_path / "tmp"
    temporary.mkdir()
    chief, other = start_workers(run, temporary=temporary)
    while chief.poll() is None and not (run / "backup" / "checkpoint").is_file():
        time.sleep(0.05)
    other.send_signal(signal.SIGKILL)  # the chief then fails or waits for it: the job is restarted
    chief.send_signal(signal.SIGKILL)
    for worker in (chief, other):
        worker.communicate()
    resumed, _ = run_workers(run, "resume", temporary=temporary)
    np.testing.assert_allclose(resumed, through, atol=1e-5)
    np.testing.assert_allclose(load_encoder(str(run))(IMAGE), through, atol=1e-5)
    assert not [name for name in os.listdir(run / "backup") if name.startswith("workertemp")]
    assert not [path for path in temporary.iterdir() if path.is_dir()]  # AutoGraph leaves files of code there


def test_a_slurm_task_on_a_node_without_gpus_trains(tmp_path):
    """SlurmClusterResolver given 0 GPUs per node divided them in steps of 0: "range() arg 3 must not be zero"."""
    import shutil
    if shutil.which("nvidia-smi", path="/usr/bin:/bin"):
        pytest.skip("nvidia-smi is found: the task would take the GPU resolver")
    with socket.socket() as taken:  # the resolver's first port, which the task's server binds
        if taken.connect_ex(("127.0.0.1", 8888)) == 0:
            pytest.skip("port 8888, SLURM's first task's, is in use")
    env = {key: value for key, value in os.environ.items() if key != "TF_CONFIG"}
    env.update(SLURM_STEP_NUM_TASKS="1", SLURM_PROCID="0", SLURM_STEP_NODELIST="localhost",
               SLURM_STEP_TASKS_PER_NODE="1", TF_CPP_MIN_LOG_LEVEL="3", PATH="/usr/bin:/bin")  # no nvidia-smi
    result = subprocess.run([sys.executable, "-m", "cifl_tf.cli", "train-encoder", "--strategy", "multiworker",
                             "--shape", "16x16", "--steps", "2", "--batch-size", "2", "--channels", "2", "--features",
                             "4", "--max-offset", "4", "--out", str(tmp_path / "run")],
                            env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert load_encoder(str(tmp_path / "run")).channels == 2


UNEVEN = """
import tensorflow as tf
tf.config.set_logical_device_configuration(tf.config.list_physical_devices("CPU")[0],
                                           [tf.config.LogicalDeviceConfiguration()] * 2)
import cifl_tf
try:
    cifl_tf.train_encoder(shape=(16, 16), steps=1, batch_size=3, channels=2, features=2, max_offset=2, verbose=0,
                          strategy=tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]), out_dir=__import__("sys").argv[1])
except ValueError as error:
    print(error)
"""


def test_a_global_batch_that_the_replicas_cannot_share_equally_is_refused_before_the_run_is_written(tmp_path):
    # each replica's mean loss counted alike: with 3 pairs over 2 workers, the lone pair weighed twice the others
    result = subprocess.run([sys.executable, "-c", UNEVEN, str(tmp_path / "run")], cwd=REPO, capture_output=True,
                            text=True, timeout=300, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert "batch_size 3 must be a multiple of the 2 replicas that train it" in result.stdout, result.stderr[-2000:]
    assert not (tmp_path / "run").exists()
