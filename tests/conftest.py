"""Tiny random models built from configs in code, with a tiny tokenizer trained on builtin text: all offline."""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The tests' datasets (local copies of c4 and wikitext, lm-eval's tiny task) are cached in a folder of their
# own, removed at the end: never in the user's ~/.cache/huggingface, where a fake "wikitext" would later be
# served as the real one when the hub is out of reach. Set before anything imports datasets.
_DATASETS_CACHE = tempfile.mkdtemp(prefix="stade-tests-datasets-")
os.environ["HF_DATASETS_CACHE"] = _DATASETS_CACHE


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(_DATASETS_CACHE, ignore_errors=True)

VOCAB = 384

# architecture → config kwargs of a tiny model. Adding an architecture: one line here.
TINY = {
    "llama": ("LlamaConfig", dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=2)),
    "opt": ("OPTConfig", dict(hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                              word_embed_proj_dim=32)),
    "qwen2": ("Qwen2Config", dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=2)),
    "mistral": ("MistralConfig", dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2)),
    "gemma": ("GemmaConfig", dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=2, head_dim=8)),
    "gemma3": ("Gemma3TextConfig", dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                                        num_attention_heads=4, num_key_value_heads=2, head_dim=8, sliding_window=16,
                                        layer_types=["sliding_attention", "full_attention"] * 2)),
}
# mixtures of experts: experts stored per expert on disk (Mixtral, Qwen2-MoE with a shared expert, Qwen3-MoE,
# DeepSeek-V3 with shared experts and a router correction bias) and
# fused 3-D on disk (Granite-MoE [E, out, in]; GPT-OSS [E, in, out], interleaved gate/up, expert biases)
MOE = {
    "mixtral": ("MixtralConfig", dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2)),
    "qwen2_moe": ("Qwen2MoeConfig", dict(hidden_size=32, intermediate_size=64, moe_intermediate_size=24,
                                         shared_expert_intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                                         num_key_value_heads=2, num_experts=4, num_experts_per_tok=2)),
    "qwen3_moe": ("Qwen3MoeConfig", dict(hidden_size=32, intermediate_size=64, moe_intermediate_size=24,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                         num_experts=4, num_experts_per_tok=2)),
    "deepseek_v3": ("DeepseekV3Config", dict(hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
                                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                                             n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1,
                                             first_k_dense_replace=0, n_group=1, topk_group=1, q_lora_rank=16,
                                             kv_lora_rank=16, qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=8)),
    "granitemoe": ("GraniteMoeConfig", dict(hidden_size=32, intermediate_size=24, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                            num_experts_per_tok=2)),
    "gpt_oss": ("GptOssConfig", dict(hidden_size=32, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
                                     num_key_value_heads=2, head_dim=8, num_local_experts=4, num_experts_per_tok=2,
                                     layer_types=["sliding_attention", "full_attention"])),
}


def pytest_collection_modifyitems(config, items):
    skip_cuda = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_cuda)


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    """A byte-level BPE tokenizer trained on the builtin text (no download)."""
    from pydoc_data.topics import topics
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(list(topics.values()), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")
    out = tmp_path_factory.mktemp("tokenizer")
    fast.save_pretrained(out)
    return out


def build_tiny(arch: str, out: Path, tokenizer_dir: Path, seed: int = 0, **overrides) -> Path:
    import shutil

    import transformers
    from transformers import AutoModelForCausalLM

    cls_name, kwargs = {**TINY, **MOE}[arch]
    if not hasattr(transformers, cls_name):
        pytest.skip(f"transformers {transformers.__version__} has no {cls_name}")
    config = getattr(transformers, cls_name)(vocab_size=VOCAB, max_position_embeddings=256,
                                            **{**kwargs, **overrides})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # give activations a visible mean, as real models have, so std ≠ norm
        for name, p in model.named_parameters():
            if "norm" in name and p.dim() == 1 and "bias" not in name:
                p.add_(0.5 * torch.rand_like(p))
    model.save_pretrained(out)
    for f in tokenizer_dir.iterdir():
        shutil.copy(f, out / f.name)
    return out


@pytest.fixture(scope="session")
def tiny_factory(tmp_path_factory, tokenizer_dir):
    cache: dict = {}

    def make(arch: str = "llama", **overrides) -> Path:
        key = (arch, tuple(sorted(overrides.items())))
        if key not in cache:
            cache[key] = build_tiny(arch, tmp_path_factory.mktemp(f"tiny-{arch}"), tokenizer_dir, **overrides)
        return cache[key]

    return make


@pytest.fixture(scope="session")
def tiny_llama(tiny_factory) -> Path:
    return tiny_factory("llama")


@pytest.fixture(scope="session")
def gram_stats(tiny_llama, tmp_path_factory) -> Path:
    """``calibrate --gram`` of the tiny Llama on 8 × 32 builtin tokens (read-only for the tests that share it)."""
    from typer.testing import CliRunner

    from stade_cli.cli.app import app

    out = tmp_path_factory.mktemp("gram-stats") / "s"
    args = ["calibrate", str(tiny_llama), "-o", str(out), "--dataset", "builtin", "--nsamples", "8", "--seqlen", "32",
            "--gram"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="session")
def text_file(tmp_path_factory) -> Path:
    from pydoc_data.topics import topics

    path = tmp_path_factory.mktemp("text") / "calib.txt"
    path.write_text("\n\n".join(topics[k] for k in sorted(topics)[:60]))
    return path


SMOLLM2 = Path(os.environ.get("STADE_ASSETS", Path.home() / ".cache" / "stade-assets")) / "smollm2-135m"
AUSTEN = Path(__file__).resolve().parents[2] / "shared" / "data" / "austen"
ROOT = Path(__file__).resolve().parents[1]       # the repository
