"""``sinks='bos'``: the sink gate after the beginning-of-sequence token, the paper's rules after a word."""

from __future__ import annotations

import inspect
import warnings

import pytest
import tiny_models as tm
import torch

import lxt_explicit as lxt
from lxt_explicit import functional as lf
from lxt_explicit.presets import SINKS, attnlrp_sinks
from lxt_explicit.sink_extensions import bos_token_ids, first_tokens_are_bos
from lxt_explicit.stabilizer import DEFAULT_EPSILON

# ------------------------------------------------------------------------------ the decision, by hand


def test_first_tokens_are_bos_on_hand_made_batches():
    assert first_tokens_are_bos(torch.tensor([[1, 5, 6], [1, 7, 8]]), (1,))
    assert not first_tokens_are_bos(torch.tensor([[5, 1, 6], [4, 1, 1]]), (1,))  # BOS later in the text: no
    assert first_tokens_are_bos(torch.tensor([1, 4]), (1,))  # one unbatched sequence
    assert first_tokens_are_bos(torch.tensor([[2, 3]]), (1, 2))  # a model with several BOS ids
    padded = torch.tensor([[0, 0, 1, 5], [1, 5, 6, 7]])
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    assert first_tokens_are_bos(padded, (1,), mask)  # left padding: the first unmasked token counts
    with pytest.raises(ValueError, match=r"sequences \[1\] of 2 start with it"):
        first_tokens_are_bos(padded, (1,))  # without the mask, row 0 starts with padding


def test_bos_token_ids_come_from_the_config_or_the_generation_config():
    model = tm.build("llama", attn="sdpa")
    assert bos_token_ids(model) == (model.config.bos_token_id,) == (1,)
    model.config.bos_token_id = None
    model.generation_config.bos_token_id = [3, 4]  # generation configs may list several
    assert bos_token_ids(model) == (3, 4)
    model.generation_config.bos_token_id = None
    assert bos_token_ids(model) == ()


# ------------------------------------------------------------------------------ on a model


def relevance(model, composite, **inputs):
    with composite.context(model):
        logits = model(**inputs, use_cache=False).logits
        goals = logits[:, -1].max(-1).values
        goals.backward(goals.detach())
        return logits.detach(), composite.source_relevance()["model.embed_tokens"].sum(-1)


@pytest.fixture(scope="module")
def llama():
    return tm.build("llama", attn="sdpa")


def test_bos_is_the_gate_after_bos_and_the_paper_rule_after_a_word(llama):
    bos = llama.config.bos_token_id
    reference = llama(input_ids=torch.tensor([[bos, 5, 17, 33, 8]]), use_cache=False).logits
    for first, same_as in ((bos, "gate"), (4, None)):
        ids = torch.tensor([[first, 5, 17, 33, 8]])
        logits, ours = relevance(llama, lxt.attnlrp(sinks="bos"), input_ids=ids)
        _, expected = relevance(llama, lxt.attnlrp(sinks=same_as), input_ids=ids)
        _, other = relevance(llama, lxt.attnlrp(sinks=None if same_as else "gate"), input_ids=ids)
        assert torch.equal(ours, expected)
        assert (ours - other).abs().max() > 1e-4  # the two settings differ on this model: the test can fail
        if first == bos:
            assert torch.equal(logits, reference)  # forward unchanged while registered
            assert ours[0, 0] == 0.0  # the BOS token is a constant: its value term a bias, its relevance 0
        else:
            assert ours[0, 0] != 0.0  # a word in the first position keeps its relevance


def test_bos_reads_the_ids_of_an_inner_model_called_alone(llama):
    bos = llama.config.bos_token_id
    composite = lxt.attnlrp(sinks="bos")
    results = {}
    with composite.context(llama):
        llama(input_ids=torch.tensor([[bos, 5, 6]]), use_cache=False)  # the last forward pass started with BOS
        for first in (4, bos):  # the base model alone: its own ids decide, not the previous call's
            hidden = llama.model(input_ids=torch.tensor([[first, 5, 17, 33]]), use_cache=False).last_hidden_state
            hidden[0, -1].sum().backward()
            newest = [k for k in composite.source_relevance() if k.startswith("model.embed_tokens")][-1]
            results[first] = composite.source_relevance()[newest].sum(-1)  # (sources gather until the model runs)
    assert results[4][0, 0] != 0.0 and results[bos][0, 0] == 0.0


def test_bos_decision_ends_with_its_forward_pass(llama):
    bos = llama.config.bos_token_id
    layer = llama.model.layers[0]
    hidden = torch.randn(1, 3, llama.config.hidden_size, requires_grad=True)
    position = llama.model.rotary_emb(hidden, torch.arange(3)[None])
    with lxt.attnlrp(sinks="bos").context(llama):
        llama(input_ids=torch.tensor([[bos, 5, 6]]), use_cache=False)  # a forward pass after BOS
        # a layer called on its own has no ids: refused, not run with the previous call's gate
        with pytest.raises(RuntimeError, match="needs the input_ids"):
            layer(hidden, position_embeddings=position, attention_mask=None)


def layer_input_relevance(model, ids, *, interleave=None, reentrant=None, sinks="bos"):
    """Relevance at the first layer's input for ``ids``; ``interleave``: ids of a forward pass before the backward."""
    if reentrant is not None:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": reentrant})
        model.train()
        if reentrant:  # reentrant checkpointing needs an input that requires grad to build the graph
            model.enable_input_require_grads()
    kept = []
    hook = model.model.layers[0].register_forward_pre_hook(
        lambda module, args, kwargs: kept.append(args[0] if args else kwargs["hidden_states"]), with_kwargs=True)
    try:
        with lxt.attnlrp(sinks=sinks).context(model):
            goal = model(input_ids=ids, use_cache=False).logits[0, -1].max()
            kept[0].retain_grad()
            if interleave is not None:
                model(input_ids=interleave, use_cache=False)
            goal.backward()
    finally:
        hook.remove()
        if reentrant is not None:
            model.activation_checkpointing_disable()
            model.eval()
    return (kept[0] * kept[0].grad).sum(-1).detach()


@pytest.mark.parametrize("reentrant", [False, True])
def test_bos_recomputation_keeps_its_forward_pass_decision(reentrant):
    model = tm.build("llama", attn="sdpa")
    bos = model.config.bos_token_id
    after_bos, after_word = torch.tensor([[bos, 5, 17, 33, 8]]), torch.tensor([[4, 5, 17, 33, 8]])
    expected = layer_input_relevance(model, after_bos)
    paper = layer_input_relevance(model, after_bos, sinks=None)  # what the word's decision gives: the test can fail
    assert expected[0, 0] == 0.0 and (expected - paper).abs().max() > 1e-4
    # checkpointed layers are recomputed in the backward pass, after a forward pass that starts with a word
    actual = layer_input_relevance(model, after_bos, interleave=after_word, reentrant=reentrant)
    assert torch.allclose(actual, expected, rtol=1e-10, atol=1e-12)


def test_bos_on_a_left_padded_batch_reads_each_first_real_token(llama):
    bos = llama.config.bos_token_id
    prompts = [[bos, 5, 17, 33, 8], [bos, 9, 12]]
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    inputs = {"input_ids": ids, "attention_mask": mask, "position_ids": (mask.cumsum(-1) - 1).clamp(min=0)}
    _, ours = relevance(llama, lxt.attnlrp(sinks="bos"), **inputs)
    _, gate = relevance(llama, lxt.attnlrp(sinks="gate"), **inputs)
    assert torch.equal(ours, gate)
    mixed = dict(inputs, input_ids=ids.masked_fill(ids == bos, 7))
    mixed["input_ids"][0, -len(prompts[0])] = bos  # row 0 starts with BOS, row 1 with a word
    with pytest.raises(ValueError, match=r"sequences \[0\] of 2 start with it"):
        relevance(llama, lxt.attnlrp(sinks="bos"), **mixed)


def test_bos_without_input_ids_is_refused_with_what_to_do(llama):
    embeddings = llama.model.embed_tokens(torch.tensor([[llama.config.bos_token_id, 5, 6]]))
    composite = lxt.attnlrp(sinks="bos")
    with composite.context(llama), pytest.raises(RuntimeError, match="Call the model with input_ids"):
        llama(inputs_embeds=embeddings.requires_grad_(), use_cache=False)
    prompt = torch.tensor([[llama.config.bos_token_id, 5, 6]])
    with composite.context(llama):  # generation continues a cache: no relevance, the plain forward pass
        generated = llama.generate(prompt, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert torch.equal(generated, llama.generate(prompt, max_new_tokens=3, do_sample=False, pad_token_id=0))
    with composite.context(llama), torch.enable_grad(), pytest.raises(RuntimeError, match="key-value cache"):
        output = llama(input_ids=prompt, use_cache=True)
        name = "cache" if "cache" in inspect.signature(type(llama).forward).parameters else "past_key_values"
        llama(input_ids=torch.tensor([[7]]), use_cache=True, **{name: output.past_key_values})
    with pytest.raises(ValueError, match="sinks='gate'"):  # the functional has no input ids to read
        q = torch.randn(1, 2, 3, 4, requires_grad=True)
        lf.scaled_dot_product_attention(q, q, q, sinks="bos")


@pytest.mark.parametrize("case", ["no_bos_id", "bidirectional"])
def test_bos_on_a_model_it_cannot_gate_warns_and_gives_the_paper_rules(case):
    if case == "no_bos_id":
        model = tm.build("llama", attn="sdpa")
        model.config.bos_token_id = model.generation_config.bos_token_id = None
        inputs = {"input_ids": torch.tensor([[1, 5, 17, 33]])}
        name = "model.embed_tokens"
    else:
        model = tm.build("bert", attn="sdpa")
        inputs = tm.inputs("bert")
        name = "bert.embeddings.word_embeddings"
    results = []
    for composite, expect_warning in ((lxt.attnlrp(sinks="bos"), True), (lxt.attnlrp(), False)):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with composite.context(model):
                output = model(**inputs).logits
                output[0, -1].max().backward()
                results.append(composite.source_relevance()[name])
        messages = [str(w.message) for w in caught if "sinks='bos'" in str(w.message)]
        assert bool(messages) == expect_warning, messages
    assert torch.equal(results[0], results[1])


def test_bos_registration_leaves_no_trace(llama):
    ids = torch.tensor([[llama.config.bos_token_id, 5, 17, 33, 8]])
    before = llama(input_ids=ids, use_cache=False).logits
    hooks = [(dict(m._forward_pre_hooks), dict(m._forward_hooks)) for m in llama.modules()]
    composite = lxt.attnlrp(sinks="bos").register(llama)
    composite.remove()
    assert all("forward" not in m.__dict__ for m in llama.modules())
    assert hooks == [(dict(m._forward_pre_hooks), dict(m._forward_hooks)) for m in llama.modules()]
    assert torch.equal(llama(input_ids=ids, use_cache=False).logits, before)


def test_the_sink_preset_defaults_to_bos():
    assert SINKS == "bos" and attnlrp_sinks().ops["attention"].sinks == "bos"
    assert lxt.attnlrp(sinks="bos").ops["attention"].options() == {"epsilon": DEFAULT_EPSILON, "cp": False,
                                                                  "sinks": "bos"}
