"""
How strong are the model's tests? Mutation testing of foldgpt.py with cosmic-ray: each mutant is
foldgpt.py with one small change (an operator, a comparison, a number, a boolean, a keyword),
and the fast model tests (test_model.py, stopping at the first failure) must fail on it. Prints
the share of mutants killed and every survivor with its diff. Not part of the test suite: the
default sample takes about 30 minutes on 2 cores.

    pip install cosmic-ray
    python mutation.py                     # 250 mutants drawn with seed 1337, 2 at a time
    python mutation.py --mutants=0         # every mutant (thousands: many hours)

Each worker mutates its own copy of the project in a temporary folder, never this one.
docs/tests.md gives the last run's figure and why each survivor survives.
"""

import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

from configurator import configure, fail

HERE = os.path.dirname(os.path.abspath(__file__))


@dataclass
class MutationConfig:
    mutants: int = 250  # mutants drawn at random from all of cosmic-ray's; 0: every one
    seed: int = 1337  # which mutants are drawn
    workers: int = 2  # copies of the project mutated and tested side by side
    timeout: float = 120.0  # seconds before a mutant's tests count as hung (killed)
    report: str = "mutation.txt"  # every survivor's diff goes here too; '' writes none


CONFIG = """[cosmic-ray]
module-path = "foldgpt.py"
timeout = {timeout}
excluded-modules = []
test-command = "{python} -m pytest -x -q -p no:cacheprovider test_model.py"

[cosmic-ray.distributor]
name = "local"
"""


def copy_project(folder):
    """The files test_model.py reads, copied into folder: the code, the presets, the design."""
    for name in os.listdir(HERE):
        if name.endswith(".py"):
            shutil.copy(os.path.join(HERE, name), folder)
    shutil.copytree(os.path.join(HERE, "config"), os.path.join(folder, "config"))
    os.makedirs(os.path.join(folder, "docs"))
    shutil.copy(os.path.join(HERE, "docs", "design.md"), os.path.join(folder, "docs"))


def main(cfg):
    try:
        from cosmic_ray.work_db import WorkDB, use_db
    except ImportError:
        fail("mutation.py needs cosmic-ray: pip install cosmic-ray")
    root = tempfile.mkdtemp(prefix="foldgpt-mutants-")
    folders = [os.path.join(root, f"w{k}") for k in range(cfg.workers)]
    for folder in folders:
        os.makedirs(folder)
        copy_project(folder)
        with open(os.path.join(folder, "cr.toml"), "w") as f:
            f.write(CONFIG.format(timeout=cfg.timeout, python=sys.executable))
    cr = [sys.executable, "-m", "cosmic_ray.cli"]
    subprocess.run(cr + ["init", "cr.toml", "all.sqlite"], cwd=folders[0], check=True)
    with use_db(os.path.join(folders[0], "all.sqlite"), WorkDB.Mode.open) as db:
        items = sorted(db.work_items, key=lambda item: item.job_id)
    items.sort(key=lambda item: (item.mutations[0].start_pos, item.mutations[0].operator_name,
                                 item.mutations[0].occurrence))  # an order init does not change
    drawn = random.Random(cfg.seed).sample(items, cfg.mutants) if cfg.mutants else items
    print(f"{len(drawn)} of {len(items)} mutants of foldgpt.py, {cfg.workers} at a time; "
          f"in {root}", flush=True)
    for k, folder in enumerate(folders):
        with use_db(os.path.join(folder, "part.sqlite")) as db:
            db.add_work_items(drawn[k::cfg.workers])
    env = dict(os.environ, OMP_NUM_THREADS="1")  # one core per worker
    t0 = time.time()
    runs = [subprocess.Popen(cr + ["exec", "cr.toml", "part.sqlite"], cwd=folder, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            for folder in folders]
    for run in runs:
        run.wait()
    done = []
    for folder in folders:
        with use_db(os.path.join(folder, "part.sqlite"), WorkDB.Mode.open) as db:
            done.extend(db.completed_work_items)
    survivors = [(item, result) for item, result in done if not result.is_killed]
    killed = len(done) - len(survivors)
    lines = [f"{killed} of {len(done)} mutants killed ({100 * killed / max(1, len(done)):.1f}%), "
             f"{len(survivors)} survived; {(time.time() - t0) / 60:.1f} min"]
    for item, result in sorted(survivors, key=lambda s: s[0].mutations[0].start_pos):
        m = item.mutations[0]
        lines.append(f"\n--- survived: {m.operator_name} at line {m.start_pos[0]}")
        lines.append((result.diff or "").strip())
    print("\n".join(lines))
    if cfg.report:
        with open(cfg.report, "w") as f:
            f.write("\n".join(lines) + "\n")
        print(f"wrote {cfg.report}")
    shutil.rmtree(root)


if __name__ == "__main__":
    main(configure(MutationConfig(), sys.argv[1:]))
