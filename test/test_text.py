"""Text side: truncated-context encoding, caches, templates, vocabulary parsing and versions.

The truncated encoder cuts the 77-token context to the longest prompt; with the causal mask no
token attends to a later one, so the end-of-text embedding must not change. That is checked
against open_clip's own `encode_text` on the tiny model and on the real ViT-B/16 text tower.
"""

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import build_tiny

from ovseg_ros.engine import Vocabulary, parse_vocabulary
from ovseg_ros.engine.labeling import DenseMaps, label_pixels
from ovseg_ros.engine.templates import IMAGENET80, SEVEN, SINGLE, get_templates
from ovseg_ros.engine.text import (
    MAX_CLASSES,
    MAX_NAME_CHARS,
    MAX_QUERIES,
    TextEncoder,
    excerpt,
    parse_background,
)

PROMPTS = [
    "a photo of a cat.",
    "a photo of a very long and unusually descriptive red double-decker bus on a rainy day.",
    "dog",
    "",
]


def make_encoder(backbone, cache_dir=None):
    """A TextEncoder on a backbone's model (no disk cache unless cache_dir is given)."""
    return TextEncoder(backbone.model, backbone.name, backbone.device, backbone.dtype, cache_dir)


# --- truncated context ----------------------------------------------------------------------


def check_truncation(backbone):
    encoder = make_encoder(backbone)
    assert encoder.tower is not None  # the fast path is in use
    tokens = encoder.tokenize(PROMPTS)
    assert tokens.shape == (len(PROMPTS), 77)
    truncated = encoder.encode_tokens(tokens, truncate=True)
    full = encoder.encode_tokens(tokens, truncate=False)
    with torch.no_grad():
        reference = F.normalize(backbone.model.encode_text(tokens).float(), dim=-1)
    torch.testing.assert_close(truncated, full, atol=1e-5, rtol=0)
    torch.testing.assert_close(truncated, reference, atol=1e-5, rtol=0)
    torch.testing.assert_close(truncated.norm(dim=-1), torch.ones(len(PROMPTS)))


def test_truncated_context_equals_full_context_tiny(tiny_backbone):
    check_truncation(tiny_backbone)


@pytest.mark.slow
def test_truncated_context_equals_full_context_vitb16(vitb16_backbone):
    check_truncation(vitb16_backbone)


# --- caches ---------------------------------------------------------------------------------


def test_memory_cache_skips_the_model(tiny_backbone, monkeypatch):
    encoder = make_encoder(tiny_backbone)
    first = encoder.encode(["cat", "dog"], "seven")
    calls = encoder.model_calls
    assert calls >= 1

    def refuse(*args, **kwargs):
        raise AssertionError("the text model ran on a cache hit")

    monkeypatch.setattr(encoder, "encode_tokens", refuse)
    again = encoder.encode(["dog", "cat"], "seven")
    assert encoder.model_calls == calls
    torch.testing.assert_close(again, first.flip(0), atol=0, rtol=0)


def test_cache_is_per_template_set(tiny_backbone):
    encoder = make_encoder(tiny_backbone)
    single = encoder.encode(["cat"], "single")
    calls = encoder.model_calls
    seven = encoder.encode(["cat"], "seven")
    assert encoder.model_calls == calls + 1
    assert not torch.allclose(single, seven)


def test_only_missing_queries_are_encoded(tiny_backbone, monkeypatch):
    encoder = make_encoder(tiny_backbone)
    encoder.encode(["cat"], "single")
    seen = []
    original = encoder.encode_tokens

    def spy(tokens, truncate=True):
        seen.append(tokens.shape[0])
        return original(tokens, truncate)

    monkeypatch.setattr(encoder, "encode_tokens", spy)
    out = encoder.encode(["cat", "dog", "bird"], "single")
    assert seen == [2]
    assert out.shape == (3, tiny_backbone.embed_dim)


def test_disk_cache_is_reused_by_a_new_encoder(tiny_backbone, tmp_path):
    first = make_encoder(tiny_backbone, tmp_path)
    stored = first.encode(["cat", "traffic light"], "seven")
    files = list((tmp_path / first.fingerprint / "seven").glob("*.npy"))
    assert len(files) == 2

    second = make_encoder(tiny_backbone, tmp_path)
    assert second.fingerprint == first.fingerprint
    loaded = second.encode(["cat", "traffic light"], "seven")
    assert second.model_calls == 0
    torch.testing.assert_close(loaded, stored, atol=0, rtol=0)


def test_unreadable_cache_file_is_recomputed(tiny_backbone, tmp_path):
    first = make_encoder(tiny_backbone, tmp_path)
    stored = first.encode(["cat"], "single")
    (path,) = (tmp_path / first.fingerprint / "single").glob("*.npy")
    path.write_bytes(b"corrupt")
    second = make_encoder(tiny_backbone, tmp_path)
    torch.testing.assert_close(second.encode(["cat"], "single"), stored)
    assert second.model_calls == 1


def test_fingerprint_depends_on_weights(tiny_backbone):
    other = build_tiny(seed=11)
    assert make_encoder(other).fingerprint != make_encoder(tiny_backbone).fingerprint
    assert make_encoder(tiny_backbone).fingerprint == make_encoder(tiny_backbone).fingerprint


def test_fingerprint_depends_on_the_activation():
    # The same weights under GELU and QuickGELU embed differently: their caches must not mix.
    from open_clip.transformer import QuickGELU

    quick, plain = build_tiny(seed=3), build_tiny(seed=3)  # ovseg-tiny is QuickGELU
    for module in list(plain.model.modules()):
        for name, child in module.named_children():
            if isinstance(child, QuickGELU):
                setattr(module, name, torch.nn.GELU())
    assert make_encoder(plain).fingerprint != make_encoder(quick).fingerprint


def test_memory_cache_is_bounded_and_least_recently_used_goes_first(tiny_backbone):
    encoder = make_encoder(tiny_backbone)
    one = encoder.encode(["q0"], "single")
    per_query = one.numel() * one.element_size()
    encoder.memory_limit = 10 * per_query
    for i in range(1, 50):  # 49 more vocabularies of one new query each
        encoder.encode([f"q{i}"] + (["q1"] if i > 1 else []), "single")  # q1 kept in use
    assert encoder.memory_bytes <= encoder.memory_limit
    calls = encoder.model_calls
    encoder.encode(["q1", "q49"], "single")  # recently used: still cached
    assert encoder.model_calls == calls
    encoder.encode(["q2"], "single")  # least recently used: dropped, encoded again
    assert encoder.model_calls == calls + 1


def test_memory_cache_stays_flat_over_a_thousand_vocabularies(tiny_backbone):
    encoder = make_encoder(tiny_backbone)
    encoder.memory_limit = 64 * 2**10
    for i in range(1000):
        encoder.encode([f"class {i} a", f"class {i} b"], "single")
    assert encoder.memory_bytes <= 64 * 2**10


# --- templates ------------------------------------------------------------------------------


def test_template_sets():
    assert len(get_templates("imagenet80")) == 80
    assert len(get_templates("seven")) == 7
    assert len(get_templates("single")) == 1
    assert get_templates("single") == SINGLE == ("a photo of a {}.",)
    assert set(SEVEN) <= set(IMAGENET80)
    assert len(set(IMAGENET80)) == 80
    for template in IMAGENET80:
        assert template.count("{}") == 1


def test_unknown_template_set():
    with pytest.raises(ValueError, match="imagenet80"):
        get_templates("ninety")


def test_encode_averages_templates(tiny_backbone):
    encoder = make_encoder(tiny_backbone)
    out = encoder.encode(["red car", "cat"], "seven")
    for row, query in zip(out, ["red car", "cat"], strict=True):
        tokens = encoder.tokenize([t.format(query) for t in SEVEN])
        per_prompt = F.normalize(tiny_backbone.model.encode_text(tokens).float(), dim=-1)
        expected = F.normalize(per_prompt.mean(dim=0), dim=-1)
        torch.testing.assert_close(row, expected, atol=1e-5, rtol=0)


# --- vocabulary parsing ---------------------------------------------------------------------


def test_parse_vocabulary_synonyms_and_whitespace():
    classes = parse_vocabulary(["  tv   monitor ; television;screen ", "cat"])
    assert [c.id for c in classes] == [0, 1]
    assert classes[0].name == "tv monitor"
    assert classes[0].synonyms == ("tv monitor", "television", "screen")
    assert classes[1].synonyms == ("cat",)


def test_repeated_synonym_within_a_class_is_kept_once():
    (cls,) = parse_vocabulary(["Cat; cat; kitty"])
    assert cls.synonyms == ("Cat", "kitty")


@pytest.mark.parametrize(
    ("entries", "message"),
    [
        ([], "empty"),
        ("cat", "not one string"),
        (["cat", ""], "entry 1 .* no class name"),
        (["cat", "   "], "entry 1 .* no class name"),
        (["cat; ;kitty"], "empty synonym"),
        (["cat;"], "empty synonym"),
        (["cat", "Dog", "dog"], "duplicate name 'dog'.* 1 and 2"),
        (["cat; kitty", "KITTY"], "duplicate name 'KITTY'.* 0 and 1"),
        (["x" * (MAX_NAME_CHARS + 1)], f"limit of {MAX_NAME_CHARS}"),
        (["cat", 3], "entry 1 is int, not a string"),
        ([None], "entry 0 is NoneType"),
    ],
)
def test_parse_vocabulary_rejects(entries, message):
    with pytest.raises(ValueError, match=message):
        parse_vocabulary(entries)


def test_parse_background_drops_vocabulary_words_and_duplicates():
    classes = parse_vocabulary(["tree; plant", "Sky blue"])
    words = parse_background([" wall ", "Tree", "PLANT", "sky", "wall", "road  side"], classes)
    assert words == ("wall", "sky", "road side")


@pytest.mark.parametrize(
    ("words", "message"),
    [("sky", "not one string"), (["sky", ""], "entry 1 is empty"), ([5], "entry 0 is int")],
)
def test_parse_background_rejects(words, message):
    with pytest.raises(ValueError, match=message):
        parse_background(words, parse_vocabulary(["cat"]))


# --- class scores ---------------------------------------------------------------------------


def pixel_outcome(logits, query_class, num_classes, background=False):
    """label_pixels on hand-made (Q, H, W) logits of a vocabulary with that query layout."""
    vocab = SimpleNamespace(
        query_class=query_class,
        num_classes=num_classes,
        unlabeled=255,
        background_words=("sky",) if background else (),
    )
    method = SimpleNamespace(has_pixel_step=False)
    h, w = logits.shape[-2:]
    maps = DenseMaps(logits[None], [(0, 0)], (h, w), (h, w), (h, w), method, vocab)
    return label_pixels(maps, (h, w))


def test_class_probability_is_max_over_synonyms():
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(6, 3, 4, generator=g) * 3
    query_class = torch.tensor([0, 0, 1, 2, 2, 3])  # 3 classes with synonyms, 1 background word
    out = pixel_outcome(logits, query_class, 3, background=True)
    softmax = torch.softmax(logits, dim=0)
    per_class = torch.stack(
        [
            torch.maximum(softmax[0], softmax[1]),
            softmax[2],
            torch.maximum(softmax[3], softmax[4]),
            softmax[5],
        ]
    )
    confidence, labels = per_class.max(dim=0)
    labels[labels == 3] = 255  # the background word won
    torch.testing.assert_close(out.confidence, confidence, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(out.labels, labels.to(torch.int32), atol=0, rtol=0)


def test_class_probability_without_synonyms_is_the_softmax():
    logits = torch.randn(3, 2, 2)
    out = pixel_outcome(logits, torch.arange(3), 3)
    confidence, labels = torch.softmax(logits, dim=0).max(dim=0)
    torch.testing.assert_close(out.confidence, confidence, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(out.labels, labels.to(torch.int32), atol=0, rtol=0)


# --- vocabulary in a Segmenter --------------------------------------------------------------


def test_vocabulary_layout(make_segmenter):
    seg = make_segmenter(vocabulary=["cat; kitten", "dog"], background_words=["sky", "Dog"])
    vocab = seg.vocabulary
    assert isinstance(vocab, Vocabulary)
    assert vocab.names == ["cat", "dog"]
    assert vocab.background_words == ("sky",)
    assert vocab.queries == ["cat", "kitten", "dog", "sky"]
    assert vocab.query_class.tolist() == [0, 0, 1, 2]
    assert vocab.embeddings.shape == (4, seg.backbone.embed_dim)
    assert vocab.embeddings.dtype == torch.float32
    torch.testing.assert_close(vocab.embeddings.norm(dim=-1), torch.ones(4))
    assert vocab.unlabeled == 255


def test_set_vocabulary_versions(make_segmenter):
    seg = make_segmenter(vocabulary=["cat", "dog"])
    v1 = seg.vocabulary.version
    v2 = seg.set_vocabulary(["car", "bus; coach"])
    v3 = seg.set_vocabulary(["person"], background_words=[], templates="seven")
    assert v2 == v1 + 1 and v3 == v2 + 1
    assert seg.vocabulary.version == v3
    assert seg.vocabulary.names == ["person"]
    assert seg.vocabulary.templates == "seven"
    assert seg.config.vocabulary == ["person"] and seg.config.background_words == []


@pytest.mark.parametrize(
    "call",
    [
        {"entries": ["cat", "Cat"]},
        {"entries": []},
        {"entries": ["cat"], "background_words": [""]},
        {"entries": ["cat"], "templates": "eighty"},
    ],
)
def test_invalid_vocabulary_keeps_the_old_one(make_segmenter, call):
    seg = make_segmenter(vocabulary=["cat", "dog"])
    before = seg.vocabulary
    config = seg.config
    with pytest.raises(ValueError):
        seg.set_vocabulary(**call)
    assert seg.vocabulary is before
    assert seg.vocabulary.version == before.version and seg.vocabulary.names == ["cat", "dog"]
    assert seg.config == config
    assert seg.set_vocabulary(["bird"]) == before.version + 1  # rejections use no version


def test_vocabulary_to_dict(make_segmenter):
    seg = make_segmenter(vocabulary=["cat; kitten", "dog"], background_words=["sky"])
    data = seg.vocabulary.to_dict()
    assert data == {
        "version": seg.vocabulary.version,
        "unlabeled": 255,
        "classes": [
            {"id": 0, "name": "cat", "synonyms": ["cat", "kitten"]},
            {"id": 1, "name": "dog", "synonyms": ["dog"]},
        ],
        "background_words": ["sky"],
        "templates": "single",
    }
    colored = seg.vocabulary.to_dict(colors=np.array([[1, 2, 3], [4, 5, 6]], np.uint8))
    assert [c["color"] for c in colored["classes"]] == [[1, 2, 3], [4, 5, 6]]
    json.dumps(colored)


def test_more_than_255_classes_use_uint16(make_segmenter):
    names = [f"thing number {i}" for i in range(300)]
    seg = make_segmenter(vocabulary=names, background_words=["sky", "wall"], short_side=32)
    assert seg.vocabulary.num_classes == 300 and seg.vocabulary.unlabeled == 65535
    image = np.random.default_rng(0).integers(0, 256, (40, 60, 3), dtype=np.uint8)
    result = seg.segment(image)
    assert result.labels.dtype == np.uint16
    assert result.unlabeled == 65535
    valid = (result.labels < 300) | (result.labels == 65535)
    assert valid.all()
    seg.update(prob_threshold=1.0)
    assert (seg.segment(image).labels == 65535).all()


# --- limits ---------------------------------------------------------------------------------


def test_vocabulary_size_is_limited_with_the_reason():
    assert len(parse_vocabulary([f"c{i}" for i in range(MAX_CLASSES)])) == MAX_CLASSES
    with pytest.raises(ValueError, match=f"limit is {MAX_CLASSES}"):
        parse_vocabulary([f"c{i}" for i in range(MAX_CLASSES + 1)])
    many_synonyms = [";".join(f"c{i}s{j}" for j in range(3)) for i in range(MAX_QUERIES // 3 + 1)]
    with pytest.raises(ValueError, match=f"more than {MAX_QUERIES}"):
        parse_vocabulary(many_synonyms)
    with pytest.raises(ValueError, match=str(MAX_QUERIES)):
        parse_background([f"w{i}" for i in range(MAX_QUERIES)], parse_vocabulary(["cat"]))


@pytest.mark.parametrize(
    "entries", [["door", "x" * 200_000], ["door", ";" + "y" * 200_000], ["y" * 200_000, "Y" * 5]]
)
def test_rejections_never_echo_a_huge_entry(entries):
    with pytest.raises(ValueError) as err:
        parse_vocabulary(entries + [entries[-1]])
    assert len(str(err.value)) < 200


def test_excerpt_cuts_and_says_how_long():
    assert excerpt("door") == "'door'"
    cut = excerpt("z" * 1000, 10)
    assert cut.startswith("'zzzzzzzzzz'...") and "1000 characters" in cut
