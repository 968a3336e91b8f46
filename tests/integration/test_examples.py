"""Every example that moves KV between clusters runs to completion on this host and reports a
byte-exact result."""
import os
import pathlib
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.multiprocess, pytest.mark.timeout(90)]

ROOT = pathlib.Path(__file__).resolve().parents[2]
EXAMPLES = ["register_tensors.py", "pull_cache.py", "pull_blocks.py", "push_blocks.py",
            "transfer_cache_async.py", "switch_role.py"]


@pytest.mark.parametrize("name", EXAMPLES)
def test_example(name):
    env = dict(os.environ, LLM_DATADIST_TORCH_DEVICE="cpu", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    # start_new_session: on a timeout the whole group (the example and its children) is killed.
    process = subprocess.Popen([sys.executable, str(ROOT / "examples" / name)], cwd=ROOT, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True)
    try:
        output, _ = process.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, 9)
        output, _ = process.communicate()
        pytest.fail(f"{name} did not finish within 60 s:\n{output}")
    assert process.returncode == 0, f"{name} exited with {process.returncode}:\n{output}"
    lines = [line for line in output.splitlines() if line.strip()]
    assert lines and "all bytes match" in lines[-1], output
