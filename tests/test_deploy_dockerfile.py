"""The Dockerfile, checked without a Docker engine.

- Its ARG defaults equal the one pin file, and `make build` passes the same values.
- It builds no DeepGEMM and installs none: vLLM's vendored copy is the only one
  (a site-packages `deep_gemm` would replace it for every kernel).
- Our wheel is installed with vLLM, torch and FlashInfer held at the pins.
- Stages are named, `COPY --from` names a stage, every plain COPY source exists
  and survives .dockerignore (which keeps secrets and the venv out).
- The runtime stage runs the doctor with the build args its labels carry, keeps
  ENTRYPOINT `vllm serve`, carries the OCI labels with the pinned versions.
- hadolint (pinned, checked-in config) reports nothing, and does report a bad file.
(The patches are checked against vLLM 0.34.0's sources in tests/vllm034.)
"""

from __future__ import annotations

import fnmatch
import re
import subprocess
from pathlib import Path

import deploy_lint as lint
import pytest

from dsv4_nvfp4.deploy import doctor
from dsv4_nvfp4.versions import pins

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"
# The ARGs that carry a pinned version, each into one image label.
VERSION_ARGS = ("VLLM_VERSION", "VLLM_TORCH_VERSION", "FLASHINFER_VERSION",
                "VENDORED_DEEPGEMM_VERSION")

pytestmark = pytest.mark.cpu


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        keyword, _, rest = line.partition(" ")
        out.append((keyword.upper(), rest.strip()))
    return out


@pytest.fixture(scope="module")
def parsed() -> list[tuple[str, str]]:
    return instructions(DOCKERFILE.read_text())


def stages(parsed) -> list[tuple[str, list[tuple[str, str]]]]:
    """[(stage name, its instructions)]; global ARGs before the first FROM are stage ''."""
    out: list[tuple[str, list[tuple[str, str]]]] = [("", [])]
    for keyword, rest in parsed:
        if keyword == "FROM":
            match = re.match(r"\S+\s+AS\s+(\S+)$", rest, re.IGNORECASE)
            assert match, f"unnamed stage: FROM {rest}"
            out.append((match.group(1), []))
        out[-1][1].append((keyword, rest))
    return out


def arg_defaults(parsed) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for keyword, rest in parsed:
        if keyword == "ARG" and "=" in rest:
            name, value = rest.split("=", 1)
            found.setdefault(name, []).append(value)
    return found


def test_arg_defaults_equal_the_pin_file(parsed):
    defaults = arg_defaults(parsed)
    pinned = pins()
    for name in ("VLLM_IMAGE", *VERSION_ARGS):
        assert name in defaults, f"Dockerfile has no ARG {name} default"
    for name, values in defaults.items():
        if name in pinned:
            assert set(values) == {pinned[name]}, f"ARG {name}={values} but pin is {pinned[name]}"
    assert defaults["VLLM_IMAGE"] == ["vllm/vllm-openai:v0.34.0"]
    assert defaults["VENDORED_DEEPGEMM_VERSION"] == ["2.8.1"]


def test_make_build_passes_the_pins_as_build_args():
    out = subprocess.run(
        ["make", "-n", "build"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    passed = dict(re.findall(r"--build-arg (\w+)=(\S+)", out))
    pinned = pins()
    for name in ("VLLM_IMAGE", *VERSION_ARGS):
        assert passed[name] == pinned[name]
    declared = {
        rest.split("=")[0] for kw, rest in instructions(DOCKERFILE.read_text()) if kw == "ARG"
    }
    assert set(passed) <= declared, f"build args without an ARG: {set(passed) - declared}"
    assert "--target runtime" in out


def test_stages_are_named_and_runtime_is_last(parsed):
    names = [name for name, _ in stages(parsed)][1:]
    assert names == ["base", "wheel", "runtime"]
    for keyword, rest in parsed:
        if keyword == "COPY" and "--from=" in rest:
            source_stage = re.search(r"--from=(\S+)", rest).group(1)
            assert source_stage in names


def test_no_deepgemm_is_built_or_installed(parsed):
    """vLLM's vendored DeepGEMM is the only one: no stage, no source, no wheel, no pin of it."""
    text = DOCKERFILE.read_text()
    for absent in ("DEEPGEMM_REPO", "DEEPGEMM_REF", "deepseek-ai/DeepGEMM", "git clone",
                   "git fetch", "bdist_wheel", "setup.py", "deep_gemm-", "TORCH_CUDA_ARCH_LIST"):
        assert absent not in text, absent
    installs = [rest for kw, rest in parsed if kw == "RUN" and "pip install" in rest]
    assert len(installs) == 1
    (install,) = installs
    assert re.findall(r"/tmp/wheels/\S+\.whl", install) == ["/tmp/wheels/dsv4_nvfp4-*.whl"]
    assert "deep_gemm" not in install.replace("dsv4_nvfp4", "")


def test_our_wheel_cannot_replace_vllm_torch_or_flashinfer(parsed):
    (install,) = [rest for kw, rest in parsed if kw == "RUN" and "pip install" in rest]
    assert "--constraints /tmp/wheels/keep.txt" in install
    kept = re.findall(r'"([\w-]+)==\$\{(\w+)\}"', install)
    assert kept == [("vllm", "VLLM_VERSION"), ("torch", "VLLM_TORCH_VERSION"),
                    ("flashinfer-python", "FLASHINFER_VERSION")]


def _doctor_run(parsed) -> str:
    runtime = dict(stages(parsed))["runtime"]
    return [rest for kw, rest in runtime if kw == "RUN"][-1]


def test_runtime_stage(parsed):
    runtime = dict(stages(parsed))["runtime"]
    assert _doctor_run(parsed).startswith("dsv4-nvfp4 doctor ")
    assert [rest for kw, rest in runtime if kw == "ENTRYPOINT"] == ['["vllm", "serve"]']
    assert not [kw for kw, _ in runtime if kw == "CMD"]  # compose appends the serve args
    labels = " ".join(rest for kw, rest in runtime if kw == "LABEL")
    for key, arg in (
        ("dsv4-nvfp4.vllm.version", "VLLM_VERSION"),
        ("dsv4-nvfp4.torch.version", "VLLM_TORCH_VERSION"),
        ("dsv4-nvfp4.flashinfer.version", "FLASHINFER_VERSION"),
        ("dsv4-nvfp4.deepgemm.version", "VENDORED_DEEPGEMM_VERSION"),
        ("org.opencontainers.image.base.name", "VLLM_IMAGE"),
        ("org.opencontainers.image.revision", "GIT_REVISION"),
    ):
        assert f'{key}="${{{arg}}}"' in labels
    assert 'dsv4-nvfp4.deepgemm.source="vllm.third_party.deep_gemm"' in labels
    assert "deepgemm.repo" not in labels and "deepgemm.ref" not in labels
    for key in ("title", "description", "licenses"):
        assert f"org.opencontainers.image.{key}=" in labels
    envs = " ".join(rest for kw, rest in runtime if kw == "ENV")
    assert f"{doctor.JIT_CACHE_ENV}=/cache/deep_gemm" in envs


def test_the_doctor_checks_what_the_labels_say(parsed):
    """The doctor RUN passes exactly the version ARGs the labels carry; with the ARG
    defaults substituted (what `make build` passes) its build-args check passes, and
    with any other value it fails the build."""
    run = _doctor_run(parsed)
    passed = re.findall(r'--build-arg "(\w+)=\$\{(\w+)\}"', run)
    assert [k for k, v in passed if k == v] == list(VERSION_ARGS)
    defaults = {k: v[0] for k, v in arg_defaults(parsed).items()}
    check = doctor.check_build_args([f"{k}={defaults[k]}" for k in VERSION_ARGS])
    assert check.ok is True, check.line()
    wrong = doctor.check_build_args(["VLLM_VERSION=0.32.0"])
    assert wrong.line() == "[FAIL] build args: VLLM_VERSION=0.32.0 but versions.env pins 0.34.0"


def test_no_secret_reaches_the_image(parsed):
    text = DOCKERFILE.read_text()
    assert "VLLM_API_KEY" not in text
    assert not re.search(r"(?i)(token|password|secret)\s*=", text)


def _ignored(path: str, patterns: list[str]) -> bool:
    """Docker's .dockerignore rule: the last matching pattern (or a parent's) wins."""
    parts = path.strip("/").split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pat = pattern[1:] if negate else pattern
        pat = pat.strip("/")
        regex = fnmatch.translate(pat).replace(".*", "[^/]*")  # `*` stays in one component
        if pat.startswith("**/"):
            regex = "(.*/)?" + fnmatch.translate(pat[3:]).replace(".*", "[^/]*")
        if any(re.fullmatch(regex, c) for c in candidates):
            ignored = not negate
    return ignored


def _dockerignore() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [ln.strip() for ln in lines if ln.strip() and not ln.startswith("#")]


def test_every_copy_source_exists_and_is_in_the_context(parsed):
    patterns = _dockerignore()
    sources = []
    for keyword, rest in parsed:
        if keyword == "COPY" and "--from=" not in rest:
            *srcs, _dest = rest.split()
            sources += srcs
    assert sources, "no COPY found"
    for src in sources:
        path = ROOT / src
        assert path.exists(), f"COPY source {src} does not exist"
        files = [p for p in path.rglob("*") if p.is_file()] if path.is_dir() else [path]
        kept = [f for f in files if not _ignored(str(f.relative_to(ROOT)), patterns)]
        if path.is_dir():
            assert kept or not files, f"{src}: every file is excluded by .dockerignore"
        else:
            assert kept, f"{src} is excluded by .dockerignore"


def test_dockerignore_keeps_secrets_and_bulk_out():
    patterns = _dockerignore()
    for path in (
        ".env",
        ".venv/bin/python",
        ".git/config",
        "out/model.safetensors",
        "tests/test_deploy_dockerfile.py",
        "src/dsv4_nvfp4/__pycache__/x.pyc",
    ):
        assert _ignored(path, patterns), f"{path} would be sent to the builder"
    for path in ("pyproject.toml", "src/dsv4_nvfp4/cli.py", "src/dsv4_nvfp4/serving/probe.py"):
        assert not _ignored(path, patterns), f"{path} would be missing from the build"


def test_hadolint_is_clean():
    result = lint.run_hadolint(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    # The single suppression is inline and explained on the lines above it.
    text = DOCKERFILE.read_text()
    assert re.findall(r"hadolint ignore=(\S+)", text) == ["DL3008"]
    above = text.split("# hadolint ignore=DL3008")[0].splitlines()[-6:]
    assert any("DL3008" in line for line in above)


def test_hadolint_reports_a_bad_dockerfile(tmp_path: Path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu\nRUN apt-get update && apt-get install -y curl\n")
    result = lint.run_hadolint(ROOT, bad)
    assert result.returncode != 0
    assert "DL3008" in result.stdout or "DL3006" in result.stdout


def test_patch_step_matches_the_doctor():
    """The build applies patches the way the doctor checks them (same -p, --fuzz=0)."""
    text = DOCKERFILE.read_text()
    assert f"patch -p{doctor.PATCH_STRIP} --fuzz=0 --forward --batch" in text
    assert "/context/patches/*.diff" in text
    assert doctor.PATCH_GLOB == "*.diff"


def test_patches_dir_holds_only_diffs():
    """A stray .patch/.orig would be silently skipped by the build."""
    patch_dir = ROOT / "patches"
    others = [p for p in patch_dir.iterdir() if p.is_file()] if patch_dir.is_dir() else []
    stray = [p.name for p in others if p.suffix not in (".diff", ".md")]
    assert not stray, f"patches/ holds files the build ignores: {stray}"
