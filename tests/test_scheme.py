"""Scheme strings, QuantScheme validation and QuantConfig overrides (docs/method.md §1, §5)."""

from __future__ import annotations

import pytest

from cbq_lightning.errors import ConfigError
from cbq_lightning.quant.config import QuantConfig, QuantTuning
from cbq_lightning.quant.scheme import QuantScheme, parse_scheme, valid_group_sizes

# --- parse_scheme -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "w_bits", "group_size", "a_bits"),
    [
        ("W4A16", 4, None, 16),
        ("W3A16G64", 3, 64, 16),
        ("w2a16g64", 2, 64, 16),
        ("W4A16G128", 4, 128, 16),
        ("W4A8", 4, None, 8),
        ("W8A8", 8, None, 8),
        ("  W6A6 ", 6, None, 6),
    ],
)
def test_parse_scheme(text, w_bits, group_size, a_bits):
    scheme = parse_scheme(text)
    assert scheme == QuantScheme(w_bits=w_bits, group_size=group_size, a_bits=a_bits, sym=False)


def test_parse_scheme_activation_flag_and_name():
    assert parse_scheme("W4A16").quantizes_activations is False
    assert parse_scheme("W4A8").quantizes_activations is True
    assert parse_scheme("w3a16g64").name == "W3A16G64"
    assert parse_scheme("W4A16").name == "W4A16"


@pytest.mark.parametrize(
    "text",
    [
        "",
        "W4",
        "A16",
        "4A16",
        "W4A",
        "W4A16G",
        "W4A16G64x",
        "WxA16",
        "W4A16-G64",
        "W4 A16",
        "W-4A16",
        "Q4A16",
    ],
)
def test_parse_scheme_rejects_malformed(text):
    with pytest.raises(ConfigError, match="not understood"):
        parse_scheme(text)


@pytest.mark.parametrize("text", ["W1A16", "W9A16", "W0A16", "W16A16"])
def test_parse_scheme_rejects_weight_bits_out_of_range(text):
    with pytest.raises(ConfigError, match="w_bits"):
        parse_scheme(text)


@pytest.mark.parametrize("text", ["W4A1", "W4A9", "W4A12"])
def test_parse_scheme_rejects_activation_bits_out_of_range(text):
    with pytest.raises(ConfigError, match="a_bits"):
        parse_scheme(text)


def test_parse_scheme_rejects_group_zero():
    with pytest.raises(ConfigError, match="group_size=0"):
        parse_scheme("W4A16G0")


def test_bit_range_limits_are_accepted():
    assert parse_scheme("W2A16").w_bits == 2
    assert parse_scheme("W8A16").w_bits == 8
    assert parse_scheme("W4A2").a_bits == 2


@pytest.mark.parametrize("kwargs", [{"w_bits": 1}, {"w_bits": 9}, {"group_size": 0}, {"group_size": -64}])
def test_quant_scheme_validation(kwargs):
    with pytest.raises(ConfigError):
        QuantScheme(**kwargs)


# --- QuantConfig.resolve ------------------------------------------------------------------------------


def test_resolve_default():
    assert QuantConfig().resolve() == QuantScheme(w_bits=4, group_size=None, a_bits=16, sym=False)


def test_resolve_reads_the_scheme_and_sym():
    assert QuantConfig(scheme="W3A16G64", sym=True).resolve() == QuantScheme(w_bits=3, group_size=64, a_bits=16,
                                                                             sym=True)


def test_resolve_rejects_a_bad_scheme():
    with pytest.raises(ConfigError, match="w_bits=9"):
        QuantConfig(scheme="W9A16").resolve()
    with pytest.raises(ConfigError, match="not understood"):
        QuantConfig(scheme="W4").resolve()


@pytest.mark.parametrize(("scheme", "a_bits"), [("W4A8", 8), ("W4A4", 4)])
def test_resolve_accepts_activation_quantization(scheme, a_bits):
    config = QuantConfig(scheme=scheme)
    resolved = config.resolve()
    assert resolved.a_bits == a_bits and resolved.quantizes_activations
    assert config.act_settings(True, QuantTuning()).bits == a_bits
    assert QuantConfig(scheme="W4A16").act_settings(True, QuantTuning()) is None


def test_the_scheme_is_the_one_key_for_bits_and_groups():
    """No override keys beside the scheme string: two keys for one fact could disagree."""
    with pytest.raises(TypeError):
        QuantConfig(scheme="W4A16", w_bits=3)  # type: ignore[call-arg]


# --- valid_group_sizes ------------------------------------------------------------------------------


def test_valid_group_sizes_576():
    sizes = valid_group_sizes(576)
    # 576 = 2^6 * 3^2: its divisors between 8 and the default limit 512
    assert sizes == [8, 9, 12, 16, 18, 24, 32, 36, 48, 64, 72, 96, 144, 192, 288]
    assert 64 in sizes
    assert 128 not in sizes
    assert 576 not in sizes  # above the default limit of 512 (per-channel is spelled -1)
    assert all(576 % g == 0 for g in sizes)


def test_valid_group_sizes_limit():
    assert valid_group_sizes(576, limit=1024)[-1] == 576
    assert valid_group_sizes(2048) == [8, 16, 32, 64, 128, 256, 512]
    assert valid_group_sizes(1536, limit=64) == [8, 12, 16, 24, 32, 48, 64]
    assert valid_group_sizes(4) == []
