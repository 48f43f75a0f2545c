"""The notebooks in colabs/: stored clean, and they run top to bottom (quick mode)."""

import contextlib
import os
import re
import sys
import tempfile
from unittest import mock

from absl.testing import absltest
import nbformat
import pytest
import testutil

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COLABS = os.path.join(REPO, "colabs")
NOTEBOOKS = ("quickstart.ipynb", "inspect_rollout.ipynb")
CELL_TIMEOUT_S = 600


def read_notebook(name: str):
  return nbformat.read(os.path.join(COLABS, name), as_version=4)


@contextlib.contextmanager
def kernel_environment():
  """A `python3` kernelspec bound to this interpreter, and the notebooks' environment.

  The spec goes in a temporary JUPYTER_PATH entry (searched first), so the kernel runs this
  venv's python whatever is on PATH or in ~/.local/share/jupyter; nothing is downloaded.
  The kernel inherits os.environ: quick mode, no progress bars, one CPU device, and a
  workdir that is deleted afterwards.
  """
  from ipykernel import kernelspec

  with tempfile.TemporaryDirectory() as tmp:
    env = testutil.subprocess_env(  # MAR_NO_PROGRESS=1, CPU, one device
        MAR_COLAB_QUICK="1", JUPYTER_PLATFORM_DIRS="1",
        JUPYTER_PATH=os.pathsep.join(
            p for p in [os.path.join(tmp, "share", "jupyter"), os.environ.get("JUPYTER_PATH")]
            if p),
        IPYTHONDIR=os.path.join(tmp, "ipython"),
        MAR_COLAB_WORKDIR=os.path.join(tmp, "workdir"))  # removed with tmp
    with mock.patch.dict(os.environ, env, clear=True):
      kernelspec.install(user=False, prefix=tmp, kernel_name="python3")
      yield


def execute(name: str):
  """Runs a notebook in colabs/ (its cwd) and returns it with outputs."""
  from nbclient import NotebookClient

  nb = read_notebook(name)
  with kernel_environment():
    client = NotebookClient(nb, kernel_name="python3", timeout=CELL_TIMEOUT_S,
                            resources={"metadata": {"path": COLABS}})
    client.execute()
  return nb


def text_output(nb) -> str:
  """All stream and text/plain outputs of the code cells, concatenated."""
  parts = []
  for cell in nb.cells:
    for out in cell.get("outputs", []):
      if out.output_type == "stream":
        parts.append(out.text)
      elif "data" in out and "text/plain" in out.data:
        parts.append(out.data["text/plain"])
  return "\n".join(parts)


def images(nb) -> list[str]:
  return [out.data["image/png"] for cell in nb.cells for out in cell.get("outputs", [])
          if "data" in out and "image/png" in out.data]


def errors(nb) -> list[str]:
  return [f"{o.ename}: {o.evalue}" for c in nb.cells for o in c.get("outputs", [])
          if o.output_type == "error"]


class StoredNotebookTest(absltest.TestCase):

  def test_saved_clean_with_python3_kernel(self):
    for name in NOTEBOOKS:
      nb = read_notebook(name)
      nbformat.validate(nb)
      self.assertEqual(nb.metadata.kernelspec.name, "python3", name)
      for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
          self.assertEqual(cell.outputs, [], f"{name} cell {i} has outputs")
          self.assertIsNone(cell.execution_count, f"{name} cell {i}")

  def test_quick_switch_and_repo_lookup(self):
    for name in NOTEBOOKS:
      src = "\n".join(c.source for c in read_notebook(name).cells if c.cell_type == "code")
      self.assertIn('QUICK = os.environ.get("MAR_COLAB_QUICK", "0") == "1"', src, name)
      self.assertIn('# !pip install -q -r ../requirements.txt', src, name)
      self.assertIn("def find_repo_root", src, name)

  def test_kernel_runs_this_interpreter(self):
    from jupyter_client.kernelspec import KernelSpecManager

    with kernel_environment():
      spec = KernelSpecManager().get_kernel_spec("python3")
      self.assertEqual(spec.argv[0], sys.executable)
      self.assertEqual(os.environ["MAR_COLAB_QUICK"], "1")


@pytest.mark.slow
class ExecuteNotebookTest(absltest.TestCase):

  def test_quickstart(self):
    nb = execute("quickstart.ipynb")
    self.assertEqual(errors(nb), [])
    out = text_output(nb)
    self.assertIn("QUICK = True", out)
    self.assertIn("trained 3 steps", out)
    # The eval table before (step 0) and after (step 3) training, one synthetic row each.
    for step in (0, 3):
      self.assertIn(f"eval at step {step}: att@k", out)
    self.assertLen(re.findall(r"^synthetic\s+32\s+\d+\.\d\s+\d+\.\d$", out, re.M), 2)
    self.assertRegex(out, r"benchmark\s+n\s+att@1\s+att@2")
    pngs = images(nb)
    self.assertLen(pngs, 2)  # attempts.png and training.png
    for png in pngs:
      self.assertTrue(png.startswith("iVBORw0KGgo"))  # base64 of the PNG signature
    self.assertRegex(out, r"(?m)^\s+3\s+[-+]?\d+\.\d{4}")  # metrics row of step 3
    self.assertIn("3 rows; all keys", out)

  def test_inspect_rollout(self):
    nb = execute("inspect_rollout.ipynb")
    self.assertEqual(errors(nb), [])
    out = text_output(nb)
    self.assertLen(re.findall(r"^==+ episode \d: What is", out, re.M), 4)
    self.assertIn("── attempt 1 (", out)
    self.assertLen(re.findall(r"── reward [+-]\d\.\d, attempts used [123]/3 ──", out), 4)
    self.assertIn("You have 3 attempts", out)
    self.assertRegex(out, r"slot\s+kind\s+att\s+logprob\s+token")
    self.assertRegex(out, r"(?m)^\s*\d+\s+action\s+1\s+-?\d+\.\d{3}\s+'")
    self.assertNotIn("FAIL", out)
    self.assertEqual(out.count("ok   "), 5)


if __name__ == "__main__":
  absltest.main()
