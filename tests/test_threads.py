"""CPU thread settings: chosen before torch loads, never over what the user set."""

import json
import os
import subprocess
import sys

from difftune.threads import available_cores, choose_cpu_threads

PROBE = (
    "import json, os, sys\n"
    "from difftune.cli import main\n"
    "assert 'torch' not in sys.modules\n"
    "sys.argv = ['difftune', '--help']\n"
    "main()\n"
    "import torch\n"
    "print(json.dumps([os.environ['OMP_WAIT_POLICY'], os.environ['OMP_NUM_THREADS'], torch.get_num_threads()]))"
)


def _probe(**environment):
    env = {k: v for k, v in os.environ.items() if not k.startswith("OMP_")}
    env.update(environment)
    done = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_unset_settings_are_chosen_and_the_users_are_kept():
    environ = {}
    assert choose_cpu_threads(environ) == {
        "OMP_WAIT_POLICY": "PASSIVE",
        "OMP_NUM_THREADS": str(available_cores()),
    }
    users = {"OMP_WAIT_POLICY": "ACTIVE", "OMP_NUM_THREADS": "3"}
    assert choose_cpu_threads(users) == {} and users == {"OMP_WAIT_POLICY": "ACTIVE", "OMP_NUM_THREADS": "3"}


def test_the_command_sets_them_before_torch_loads_so_torch_uses_them():
    policy, threads, torch_threads = _probe()
    assert policy == "PASSIVE" and int(threads) == available_cores() == torch_threads


def test_the_command_keeps_a_thread_count_the_user_chose():
    policy, threads, torch_threads = _probe(OMP_NUM_THREADS="1")
    assert (policy, threads, torch_threads) == ("PASSIVE", "1", 1)
