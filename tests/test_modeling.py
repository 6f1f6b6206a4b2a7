"""Model shape checks and seeded initialisation."""

from __future__ import annotations

import pytest

from clmlab.args import ModelArguments
from clmlab.cli import UsageError
from clmlab.modeling import build_config, check_shape, fit_config_to_tokenizer, init_model, weights_checksum

SMALL = "n_embd=32,n_layer=2,n_head=2,n_positions=64"


def test_overrides_shape_the_config():
    config = build_config(ModelArguments(config_overrides=SMALL))
    assert (config.n_embd, config.n_layer, config.n_head, config.n_positions) == (32, 2, 2, 64)


def test_unknown_override_key_lists_valid_keys():
    with pytest.raises(UsageError, match=r"'n_embed' is not a gpt2 config key; valid keys: .*n_embd.*n_head"):
        build_config(ModelArguments(config_overrides="n_embed=64"))


def test_malformed_override_is_refused():
    with pytest.raises(UsageError, match="is not key=value"):
        build_config(ModelArguments(config_overrides="n_embd=64,n_layer"))


def test_n_embd_must_divide_by_n_head():
    config = build_config(ModelArguments(config_overrides="n_embd=100,n_head=3"))
    with pytest.raises(UsageError, match="n_embd=100 is not divisible by n_head=3"):
        check_shape(config, 64)


def test_block_size_above_n_positions_is_refused():
    config = build_config(ModelArguments(config_overrides=SMALL))
    check_shape(config, 64)
    with pytest.raises(UsageError, match="--block_size 128 is above the model's n_positions=64"):
        check_shape(config, 128)


def test_overrides_refused_when_continuing_a_checkpoint(tiny_gpt2):
    with pytest.raises(UsageError, match="--config_overrides shapes a model built from scratch"):
        build_config(ModelArguments(model_name_or_path=str(tiny_gpt2), config_overrides=SMALL))


def test_tokenizer_larger_than_the_checkpoint_vocabulary_is_refused(tiny_gpt2, gpt2_tokenizer):
    config = build_config(ModelArguments(model_name_or_path=str(tiny_gpt2)))
    fit_config_to_tokenizer(config, gpt2_tokenizer, from_scratch=False)  # 50257 tokens fit
    bigger = gpt2_tokenizer.__class__.from_pretrained(tiny_gpt2)
    bigger.add_tokens(["<|user|>", "<|assistant|>"])
    with pytest.raises(UsageError, match="50259 tokens but the model's vocabulary only 50257"):
        fit_config_to_tokenizer(config, bigger, from_scratch=False)


def test_from_scratch_vocabulary_comes_from_the_tokenizer(gpt2_tokenizer):
    config = build_config(ModelArguments(config_overrides=SMALL))
    fit_config_to_tokenizer(config, gpt2_tokenizer, from_scratch=True)
    assert config.vocab_size == 50257 and config.eos_token_id == config.bos_token_id == 50256


def test_same_seed_gives_bit_identical_weights():
    config = build_config(ModelArguments(config_overrides=SMALL))
    config.vocab_size = 300
    first, second, other = (weights_checksum(init_model(config, None, seed)) for seed in (7, 7, 8))
    assert first == second != other
