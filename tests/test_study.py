"""The main job end to end at tiny scale: kill between steps, resume, report, notebook."""

import html.parser
import json
import os
import signal
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CMD = [sys.executable, "-m", "experiments.study", "--config=configs/study/stdlib.py:tiny"]


def _env():
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
  env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
  return env


@pytest.fixture(scope="module")
def study_dir(tmp_path_factory):
  """Runs the tiny study, SIGKILLs it once the target step is done, then reruns it to the end."""
  workdir = str(tmp_path_factory.mktemp("study"))
  proc = subprocess.Popen(CMD + [f"--workdir={workdir}"], cwd=ROOT, env=_env(),
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  target_done = os.path.join(workdir, "target", "DONE.json")
  deadline = time.time() + 600
  while not os.path.exists(target_done) and proc.poll() is None and time.time() < deadline:
    time.sleep(0.2)
  assert os.path.exists(target_done), "the target step never finished"
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  with open(target_done) as f:
    first_target = json.load(f)
  out = subprocess.run(CMD + [f"--workdir={workdir}"], cwd=ROOT, env=_env(), capture_output=True,
                       text=True, timeout=900)
  assert out.returncode == 0, out.stderr[-4000:]
  return workdir, first_target, out.stdout + out.stderr


def test_resume_skips_the_finished_step_and_completes(study_dir):
  workdir, first_target, log = study_dir
  assert "target: done already" in log
  with open(os.path.join(workdir, "target", "DONE.json")) as f:
    assert json.load(f) == first_target  # Not retrained.
  for step in ("drafts", "medusa", "bench"):
    assert os.path.exists(os.path.join(workdir, step, "DONE.json")), step
  assert "speculative" in log and "autoregressive" in log and "medusa" in log


class _Checker(html.parser.HTMLParser):
  """Collects ids and image alts, and checks that every non-void tag closes in order."""

  VOID = {"meta", "img", "br", "hr", "input", "link"}

  def __init__(self):
    super().__init__()
    self.stack, self.ids, self.errors = [], set(), []

  def handle_starttag(self, tag, attrs):
    attrs = dict(attrs)
    if "id" in attrs:
      self.ids.add(attrs["id"])
    if tag not in self.VOID:
      self.stack.append(tag)

  def handle_endtag(self, tag):
    if not self.stack or self.stack[-1] != tag:
      self.errors.append(f"</{tag}> closes {self.stack[-1:]}")
    else:
      self.stack.pop()


def test_report_is_valid_html_naming_every_figure_in_the_json(study_dir):
  workdir = study_dir[0]
  report_dir = os.path.join(workdir, "report")
  with open(os.path.join(report_dir, "report.json")) as f:
    results = json.load(f)
  with open(os.path.join(report_dir, "report.html")) as f:
    page = f.read()
  checker = _Checker()
  checker.feed(page)
  assert not checker.errors and not checker.stack, (checker.errors, checker.stack)
  assert page.startswith("<!DOCTYPE html>")
  assert set(results["figures"]) == {"speedup_vs_gamma", "per_position_acceptance",
                                     "training_curves"}
  for name in results["figures"]:
    assert name in checker.ids, f"figure {name} is in the JSON but not on the page"
    assert os.path.getsize(os.path.join(report_dir, f"{name}.png")) > 1000
  methods = {r["method"] for r in results["decoding"]}
  assert methods == {"autoregressive", "speculative", "medusa"}
  for row in results["decoding"]:
    assert f">{row['method']}<" in page
    assert row["tokens_per_s"] > 0 and row["speedup"] > 0
    if row["method"] == "autoregressive":
      assert row["speedup"] == 1.0
    else:  # Paired with the autoregressive runs: one ratio per repeat, the speedup their median.
      assert len(row["ratios"]) == len(row["probe_s"]) == 1  # The tiny config: bench.repeats 1.
      assert row["speedup"] == pytest.approx(row["ratios"][0])
      assert 0.0 <= row["low_compute_share"] <= 1.0
  assert "draft_scratch" in results["training"] and "target" in results["training"]
  # bench.draft_samplings: the draft distilled on greedy text runs on greedy rows only.
  by_draft = {}
  for row in results["decoding"]:
    by_draft.setdefault(row["draft"], set()).add(row["sampling"])
  assert by_draft["seqkd"] == {"greedy"} and by_draft["onpolicy_tvd"] == {"greedy", "t=1"}
  # The tiny config tunes the Medusa tree (medusa_tree_size 0): the chosen size decoded fastest.
  for row in (r for r in results["decoding"] if r["method"] == "medusa"):
    seconds = {int(k): v for k, v in row["tree_tuning"]["seconds"].items()}
    assert set(seconds) == {4, 8} and row["tree_size"] == min(seconds, key=seconds.get)
  assert "token_view" in checker.ids


def test_notebook_executes_on_the_finished_study(study_dir):
  nbformat = pytest.importorskip("nbformat")
  nbclient = pytest.importorskip("nbclient")
  workdir = study_dir[0]
  nb = nbformat.read(os.path.join(ROOT, "notebooks", "inference_efficiency_study.ipynb"),
                     as_version=4)
  os.environ.update(EFFJAX_NOTEBOOK_WORKDIR=workdir, EFFJAX_NOTEBOOK_VARIANT="tiny",
                    EFFJAX_ROOT=ROOT,
                    PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                   resources={"metadata": {"path": ROOT}})
  client.execute()
  text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code"
                 for o in c.get("outputs", []))
  assert "autoregressive" in text and "speculative" in text


def test_run_step_caches_reruns_on_change_and_keeps_the_old_run(tmp_path):
  from effjax.study.pipeline import run_step
  calls = []

  def step(tag):
    def fn(step_dir):
      calls.append(tag)
      with open(os.path.join(step_dir, "ckpt"), "w") as f:  # Stands in for checkpoints.
        f.write(tag)
      return {"tag": tag}
    return fn

  first = run_step(str(tmp_path), "s", {"lr": 1}, step("a"))
  assert first["tag"] == "a" and first["config_hash"]
  assert run_step(str(tmp_path), "s", {"lr": 1}, step("b"))["tag"] == "a"  # Cached.
  changed = run_step(str(tmp_path), "s", {"lr": 2}, step("c"))
  assert calls == ["a", "c"] and changed["config_hash"] != first["config_hash"]
  # The new run started clean; the old one is kept beside it, checkpoints and all.
  assert open(tmp_path / "s" / "ckpt").read() == "c"
  assert open(tmp_path / f"s.old-{first['config_hash']}" / "ckpt").read() == "a"
  # Back to the first config: its finished run comes back instead of training again.
  assert run_step(str(tmp_path), "s", {"lr": 1}, step("d"))["tag"] == "a" and calls == ["a", "c"]
  assert open(tmp_path / f"s.old-{changed['config_hash']}" / "ckpt").read() == "c"
  # A run killed before it finished (STARTED, no DONE) resumes in place if the config is the same.
  os.remove(tmp_path / "s" / "DONE.json")
  run_step(str(tmp_path), "s", {"lr": 1}, lambda d: {"saw": open(os.path.join(d, "ckpt")).read()})
  assert json.load(open(tmp_path / "s" / "DONE.json"))["summary"]["saw"] == "a"


def test_run_step_moves_aside_runs_it_cannot_identify(tmp_path):
  from effjax.study.pipeline import run_step
  # A directory without markers (an older version's killed run), then one whose marker a kill cut
  # short: neither is resumed into the new config, both are kept.
  os.makedirs(tmp_path / "s")
  (tmp_path / "s" / "ckpt").write_text("stale")
  run_step(str(tmp_path), "s", {"lr": 1}, lambda d: {"empty": not os.path.exists(f"{d}/ckpt")})
  assert json.load(open(tmp_path / "s" / "DONE.json"))["summary"]["empty"]
  assert (tmp_path / "s.old-unknown" / "ckpt").read_text() == "stale"
  os.remove(tmp_path / "s" / "DONE.json")
  (tmp_path / "s" / "STARTED.json").write_text('{"config_')  # Cut short mid-write.
  (tmp_path / "s" / "ckpt").write_text("half")
  run_step(str(tmp_path), "s", {"lr": 1}, lambda d: {"empty": not os.path.exists(f"{d}/ckpt")})
  assert json.load(open(tmp_path / "s" / "DONE.json"))["summary"]["empty"]
  assert (tmp_path / "s.old-unknown-2" / "ckpt").read_text() == "half"
