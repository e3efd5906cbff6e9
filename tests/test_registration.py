"""Registration under stress: copies, pickling, nesting, threads, failing undo steps, replaced parameters, compile."""

import copy
import io
import pickle
import threading

import pytest
import tiny_models as tm
import torch
from test_composite import GatedNet, gated_composite, snapshot
from torch import nn

import lxt_explicit as lxt
from lxt_explicit import Composite
from lxt_explicit.composite import UndoStack
from lxt_explicit.rules import EpsilonRule, UniformRule

D = torch.float64


def explained(model, composite, ids):
    """Relevance at the embedding of ``GatedNet`` for its summed output."""
    out = model(ids)
    out.backward(out.detach())
    return composite.source_relevance()["embed"]


def tied_llama():
    config = tm.config("llama")
    config.tie_word_embeddings = True
    torch.manual_seed(0)
    return type(tm.build("llama"))(config).double().eval()


@pytest.mark.parametrize("how", ["deepcopy", "pickle", "torch.save"])
def test_a_copy_of_a_registered_model_is_the_unregistered_model(how):
    model = tied_llama()
    inputs = tm.inputs("llama")
    reference = model(**inputs).logits
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    composite = lxt.attnlrp().register(model)
    if how == "deepcopy":
        clone = copy.deepcopy(model)
    elif how == "pickle":
        clone = pickle.loads(pickle.dumps(model))
    else:
        buffer = io.BytesIO()
        torch.save(model, buffer)
        buffer.seek(0)
        clone = torch.load(buffer, weights_only=False)
    assert not any("forward" in m.__dict__ or "__deepcopy__" in m.__dict__ for m in clone.modules())
    assert {name: p.requires_grad for name, p in clone.named_parameters()} == flags
    assert clone.lm_head.weight is clone.model.embed_tokens.weight  # tied weights stay tied
    assert all(not p.requires_grad for p in model.parameters())  # the original is still registered
    assert torch.equal(clone(**inputs).logits, reference)
    with torch.no_grad():  # the copy has its own weights: changing them changes the copy only
        clone.model.layers[0].mlp.up_proj.weight.mul_(2)
    assert not torch.equal(clone(**inputs).logits, reference)
    assert torch.equal(model(**inputs).logits, reference)
    # the copy can be explained on its own, and the original's composite stays on the original
    other = lxt.attnlrp().register(clone)
    other.remove()
    composite.remove()
    assert {name: p.requires_grad for name, p in model.named_parameters()} == flags


def test_copying_a_model_with_canonizers_registered_is_refused_clearly():
    class Merge:  # a canonizer that changes the model (as Zennit's batch-norm merging does)
        def apply(self, model):
            return []

    net = GatedNet().double()
    composite = Composite({nn.Linear: EpsilonRule}, canonizers=[Merge()]).register(net)
    with pytest.raises(RuntimeError, match="remove"):
        copy.deepcopy(net)
    with pytest.raises(RuntimeError, match="remove"):
        pickle.dumps(net)
    composite.remove()
    copy.deepcopy(net)


def test_nested_context_of_the_same_composite_keeps_the_outer_block_registered():
    net = GatedNet().double()
    ids = torch.randint(0, 10, (1, 4))
    composite = gated_composite()
    with composite.context(net):
        with composite.context(net):
            assert composite.model is net
        assert composite.model is net and "forward" in net.__dict__  # still registered after the inner block
        relevance = explained(net, composite, ids)
    assert composite.model is None and "forward" not in net.__dict__
    with composite.context(GatedNet().double()):
        with pytest.raises(RuntimeError, match="context"):
            with composite.context(net):
                pass
        with pytest.raises(RuntimeError, match="context"):
            composite.register(net)
    assert torch.isfinite(relevance).all()


def test_a_context_on_an_already_registered_model_leaves_it_registered():
    net = GatedNet().double()
    composite = gated_composite().register(net)
    with composite.context(net):
        pass
    assert composite.model is net
    composite.remove()


def test_two_threads_read_their_own_relevance():
    net = GatedNet().double().eval()
    composite = gated_composite().register(net)
    inputs = [torch.randint(0, 10, (2, 5), generator=torch.Generator().manual_seed(s)) for s in (1, 2)]
    expected = [explained(net, composite, ids).clone() for ids in inputs]
    barrier = threading.Barrier(2)
    results, errors = [None, None], []

    def work(index):
        try:
            for _ in range(20):
                out = net(inputs[index])
                barrier.wait()  # both forward passes done before either backward pass
                out.backward(out.detach())
                barrier.wait()  # both backward passes done before either reads its sources
                results[index] = composite.source_relevance()["embed"].clone()
                barrier.wait()
        except Exception as error:  # pragma: no cover - reported below
            errors.append(error)
            barrier.abort()

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    composite.remove()
    assert not errors
    for result, reference in zip(results, expected):
        torch.testing.assert_close(result, reference, rtol=1e-10, atol=1e-12)


def test_remove_runs_every_undo_step_and_raises_the_first_error_afterwards():
    class Failing:
        def __init__(self, message):
            self.message = message

        def apply(self, model):
            message = self.message

            class Handle:
                def remove(self):
                    raise ValueError(message)

            return [Handle()]

    net = GatedNet(bias=True).double()
    before = snapshot(net)
    composite = Composite({nn.Linear: EpsilonRule}, canonizers=[Failing("first"), Failing("second")]).register(net)
    with pytest.raises(ValueError, match="second") as raised:  # the last applied is undone first
        composite.remove()
    assert any("first" in note for note in raised.value.__notes__)
    after = snapshot(net)
    for key in before:
        assert before[key] == after[key], key  # every other undo step ran
    assert composite.model is None


def test_undo_stack_runs_in_reverse_order_and_continues_after_errors():
    stack, ran = UndoStack(), []
    stack.push(ran.append, 1)
    stack.push(lambda: (_ for _ in ()).throw(KeyError("boom")))
    stack.push(ran.append, 3)
    with pytest.raises(KeyError, match="boom"):
        stack.close()
    assert ran == [3, 1] and len(stack) == 0


def test_parameters_replaced_while_registered_are_kept():
    net = GatedNet().double()
    ids = torch.randint(0, 10, (1, 4))
    composite = gated_composite().register(net)
    replacement = {k: v.clone() * 2 for k, v in net.state_dict().items()}
    net.load_state_dict(replacement, assign=True)
    new_parameters = {name: p for name, p in net.named_parameters()}
    composite.remove()
    assert {name: p for name, p in net.named_parameters()} == new_parameters  # the user's objects stay
    assert all(p.requires_grad for p in net.parameters())  # and get the requires_grad their slots had
    assert torch.equal(net.head.weight, replacement["head.weight"])
    assert torch.isfinite(net(ids)).all()


@pytest.mark.parametrize("how", ["torch.compile", "module.compile"])
def test_a_compiled_model_is_refused_with_the_reason(how):
    net = GatedNet().double()
    if how == "torch.compile":
        target = torch.compile(net)
    else:
        net.compile()
        target = net
    with pytest.raises(TypeError, match="torch.compile.*uncompiled"):
        lxt.attnlrp().register(target)
    assert "forward" not in net.__dict__ and all(p.requires_grad for p in net.parameters())


def test_a_failing_registration_step_leaves_no_trace():
    class Broken:
        def register(self, model, registration):
            raise RuntimeError("extension failed")

    net = GatedNet(bias=True).double()
    before = snapshot(net)
    composite = Composite({nn.Linear: EpsilonRule}, ops={"mul": UniformRule()}, extensions=[Broken()])
    with pytest.raises(RuntimeError, match="extension failed"):
        composite.register(net)
    after = snapshot(net)
    for key in before:
        assert before[key] == after[key], key
    assert composite.model is None
