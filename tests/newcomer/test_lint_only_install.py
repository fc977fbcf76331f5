"""`pip install ftc` (no extras) is the lint-only install the pre-commit hook makes: a few MB, no
jax, torch or transformers, and it lints the examples; the commands that train say which extra
they need instead of failing with an ImportError."""

import subprocess

import fresh_install

HEAVY = ("jax", "jaxlib", "torch", "transformers", "flax", "numpy", "tensorflow-datasets")


def test_plain_pip_install_is_lint_only_small_and_lints_the_examples(tmp_path):
    repo = fresh_install.clone(tmp_path / "ftc")
    bin_dir = fresh_install.venv(tmp_path / "env")
    before = fresh_install.site_packages_bytes(tmp_path / "env")
    done = fresh_install.run(f"{bin_dir}/pip install -q {repo}", tmp_path, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    added_mb = (fresh_install.site_packages_bytes(tmp_path / "env") - before) / 2**20
    assert added_mb < 50, f"the lint-only install added {added_mb:.1f} MB"
    installed = subprocess.run([bin_dir / "pip", "list", "--format=freeze"], capture_output=True, text=True).stdout
    names = {line.split("==")[0].lower() for line in installed.splitlines()}
    assert not names & set(HEAVY), sorted(names & set(HEAVY))

    lint = fresh_install.run(f"{bin_dir}/ftc lint examples/*.toml", repo, timeout=120)
    assert lint.returncode == 0, lint.stdout + lint.stderr
    assert "error" not in lint.stdout.replace("0 errors", "")
    init = fresh_install.run(f"{bin_dir}/ftc init specs/bot.toml && {bin_dir}/ftc lint specs/bot.toml", tmp_path, 120)
    assert init.returncode == 0, init.stdout + init.stderr

    plan = fresh_install.run(f"{bin_dir}/ftc plan examples/quickstart.toml", repo, timeout=120)
    assert plan.returncode == 1 and "Traceback" not in plan.stderr
    assert "`ftc plan` needs the training stack" in plan.stderr and "pip install 'ftc[train]'" in plan.stderr
