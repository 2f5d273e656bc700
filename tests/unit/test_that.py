"""THAT: its two losses and the kNN vote against hand-computed values, the queue, the frozen clean
encoder, free-AT replays, the memory bank file, the paper preset and the serving modes."""

from __future__ import annotations

import dataclasses
import math

import faiss
import pytest
import torch
from torch import nn

from training.checkpoint import CheckpointError, save_tensors, weights_digest, write_json
from training.data import DatasetSpec, TensorImageDataset
from training.errors import ConfigError
from training.knn import (
    MEMORY_BANK,
    KNNClassifier,
    MemoryBank,
    NearestClassFeatures,
    SoftKNN,
    TopKSoftKNN,
    build_memory_bank,
    knn_search,
    knn_vote,
    memory_bank_source,
)
from training.models import Normalize, StagedNet
from training.models.two_head import CleanEncoder, CosineClassifier, FeatureQueue, RobustFeatures, THATModel, TwoHeadNet
from training.recipes import get_recipe
from training.recipes.base import StepContext
from training.recipes.that import contrastive_loss, contrastive_view, instance_contrastive_loss, random_wrong_classes
from training.runs import DEFENSE_JSON

RECIPE = get_recipe("that")
NUM_CLASSES = 3
SPEC = DatasetSpec(name="tiny", class_names=("a", "b", "c"), input_shape=(1, 8, 8), mean=(0.5,), std=(0.5,),
                   default_architecture="tiny")


def bn_backbone() -> StagedNet:
    """A tiny StagedNet with BatchNorm, so that frozen running statistics can be checked."""
    return StagedNet(
        normalize=Normalize((0.5,), (0.5,)),
        stem=nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU()),
        stages=[nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()),
                nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())],
        pool=nn.Identity(),
        classifier=nn.Linear(8, NUM_CLASSES),
    )


def tiny_model(queue_size: int = 32) -> THATModel:
    torch.manual_seed(0)
    return THATModel(CleanEncoder(bn_backbone(), NUM_CLASSES), TwoHeadNet(bn_backbone()), FeatureQueue(queue_size))


def tiny_config(**params):
    config = RECIPE.config("quick", attack_steps=2, params={"queue_size": 32, "bank_batch_size": 7, **params})
    return config.for_stage("robust")


def images(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 8, 8, generator=generator), torch.arange(n) % NUM_CLASSES


def context(model: THATModel, config) -> StepContext:
    return StepContext(model=model, module=model, config=config, augment=lambda x: x, epoch=0)


# -- losses ------------------------------------------------------------------------------------


def test_normalized_cross_entropy_matches_hand_computation() -> None:
    head = CosineClassifier(2, 2, temperature=0.5)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 2.0]]))  # unit-norm rows: [1, 0] and [0, 1]
    embeddings = torch.tensor([[3.0, 4.0], [-1.0, 0.0]])  # unit norm: [0.6, 0.8] and [-1, 0]
    logits = head(embeddings)
    # Eq. 6: cosine / eta; sample 0 has label 0, sample 1 label 1.
    expected0 = -math.log(math.exp(0.6 / 0.5) / (math.exp(0.6 / 0.5) + math.exp(0.8 / 0.5)))
    expected1 = -math.log(math.exp(0.0 / 0.5) / (math.exp(-1.0 / 0.5) + math.exp(0.0 / 0.5)))
    assert logits.flatten().tolist() == pytest.approx([1.2, 1.6, -2.0, 0.0], abs=1e-6)
    loss = nn.functional.cross_entropy(logits, torch.tensor([0, 1]))
    assert loss.item() == pytest.approx((expected0 + expected1) / 2, rel=1e-6)
    loss.backward()
    assert head.log_temperature.grad is not None and head.log_temperature.grad.abs().item() > 0  # eta is learnt


def test_contrastive_loss_matches_hand_computation() -> None:
    u = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    v = torch.tensor([[0.6, 0.8], [0.0, 1.0]])
    negatives = torch.tensor([[0.0, 1.0], [-1.0, 0.0]])
    tau = 0.5
    # Eq. 5 per sample: -log(e^{u.v/tau} / (e^{u.v/tau} + sum over negatives e^{u.n/tau})).
    expected0 = -math.log(math.exp(0.6 / tau) / (math.exp(0.6 / tau) + math.exp(0.0) + math.exp(-1.0 / tau)))
    expected1 = -math.log(math.exp(1.0 / tau) / (math.exp(1.0 / tau) + math.exp(1.0 / tau) + math.exp(0.0)))
    assert contrastive_loss(u, v, negatives, tau).item() == pytest.approx((expected0 + expected1) / 2, rel=1e-6)


# -- the queue -----------------------------------------------------------------------------------


def test_queue_is_fifo_and_wraps_around() -> None:
    queue = FeatureQueue(4, dim=2)
    keys = torch.arange(12, dtype=torch.float32).view(6, 2)  # key i = [2i, 2i + 1]
    queue.enqueue(keys[:3])
    assert queue.features[:3].tolist() == keys[:3].tolist() and queue.pointer.item() == 3
    queue.enqueue(keys[3:5])  # slot 3, then wraps: slot 0 (the oldest, key 0) is replaced
    assert queue.features.tolist() == [keys[4].tolist(), keys[1].tolist(), keys[2].tolist(), keys[3].tolist()]
    assert queue.pointer.item() == 1
    queue.enqueue(torch.cat([keys, keys]))  # more keys than slots: the newest four survive
    assert sorted(map(tuple, queue.features.tolist())) == sorted(map(tuple, keys[2:].tolist()))
    assert queue.pointer.item() == (1 + 12) % 4
    assert set(queue.state_dict()) == {"features", "pointer"}  # checkpointed with the weights


# -- the kNN vote --------------------------------------------------------------------------------


def hand_bank() -> MemoryBank:
    features = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0], [-1.0, 0.0]])
    return MemoryBank(features, torch.tensor([0, 1, 1, 2]), torch.arange(4), num_classes=3)


def test_eq8_vote_on_a_hand_made_bank() -> None:
    query = torch.tensor([[0.8, 0.6]])  # similarities: 0.8 (class 0), 0.96 (1), 0.6 (1), -0.8 (2)
    assert knn_vote(query, hand_bank(), k=2)[0].tolist() == pytest.approx([0.8, 0.96, 0.0])
    assert knn_vote(query, hand_bank(), k=3)[0].tolist() == pytest.approx([0.8, 0.96 + 0.6, 0.0])
    assert knn_vote(query, hand_bank(), k=10)[0].tolist() == pytest.approx([0.8, 1.56, -0.8])  # k > N: all
    weighted = knn_vote(query, hand_bank(), k=2, temperature=0.5)[0].tolist()
    assert weighted == pytest.approx([math.exp(0.8 / 0.5), math.exp(0.96 / 0.5), 0.0])


def random_bank(n: int = 300, dim: int = 16, classes: int = 5, seed: int = 1) -> MemoryBank:
    generator = torch.Generator().manual_seed(seed)
    features = nn.functional.normalize(torch.randn(n, dim, generator=generator), dim=1)
    return MemoryBank(features, torch.randint(0, classes, (n,), generator=generator), torch.arange(n), classes)


def test_knn_vote_equals_brute_force() -> None:
    bank, k = random_bank(), 7
    queries = nn.functional.normalize(torch.randn(9, 16, generator=torch.Generator().manual_seed(2)), dim=1)
    scores = knn_vote(queries, bank, k)
    for query, row in zip(queries.tolist(), scores.tolist()):
        similarities = [sum(a * b for a, b in zip(query, entry)) for entry in bank.features.tolist()]
        nearest = sorted(range(len(bank)), key=lambda i: -similarities[i])[:k]
        expected = [0.0] * bank.num_classes
        for i in nearest:
            expected[int(bank.labels[i])] += similarities[i]
        assert row == pytest.approx(expected, abs=1e-5)


def test_faiss_inner_product_index_finds_the_same_neighbours() -> None:
    bank, k = random_bank(n=500, dim=32), 50
    queries = nn.functional.normalize(torch.randn(20, 32, generator=torch.Generator().manual_seed(3)), dim=1)
    index = faiss.IndexFlatIP(32)
    index.add(bank.features.numpy())
    faiss_similarities, faiss_indices = index.search(queries.numpy(), k)
    similarities, indices = knn_search(queries, bank.features, k)
    assert indices.tolist() == faiss_indices.tolist()
    assert torch.allclose(similarities, torch.from_numpy(faiss_similarities), atol=1e-5)


# -- robust training -----------------------------------------------------------------------------


def test_robust_step_leaves_the_clean_encoder_untouched() -> None:
    model = tiny_model()
    model.train().requires_grad_(True)  # the worst case: nothing frozen from outside
    clean_before = {k: v.clone() for k, v in model.clean_encoder.state_dict().items()}
    robust_mean_before = model.robust.backbone.stem[1].running_mean.clone()
    x, y = images(6)
    loss, logits = RECIPE.robust_loss(context(model, tiny_config()), x, y)
    loss.backward()
    assert logits.shape == (6, NUM_CLASSES) and torch.isfinite(loss)
    assert all(p.grad is None for p in model.clean_encoder.parameters())
    assert all(torch.equal(v, clean_before[k]) for k, v in model.clean_encoder.state_dict().items())
    assert model.clean_encoder.training  # its mode is given back
    assert not torch.equal(model.robust.backbone.stem[1].running_mean, robust_mean_before)  # the robust BN moved
    assert all(p.grad is not None for p in model.robust.parameters())
    # The clean features of the batch went into the queue after the loss used it.
    assert model.queue.pointer.item() == 6
    assert torch.allclose(model.queue.features[:6], model.clean_features(x))


def test_targets_are_uniform_over_the_wrong_classes() -> None:
    torch.manual_seed(0)
    y = torch.zeros(2000, dtype=torch.long)
    targets = random_wrong_classes(y, 4)
    assert set(targets.tolist()) == {1, 2, 3}
    assert all(abs((targets == c).float().mean().item() - 1 / 3) < 0.05 for c in (1, 2, 3))


def test_free_at_replays_a_minibatch_with_a_carried_perturbation() -> None:
    model = tiny_model()
    config = tiny_config(free_replays=3, attack_target="random")
    ctx = context(model, config)
    batches = [images(4, seed) for seed in range(4)]
    deltas = []
    for step, (x, y) in enumerate(batches[:3]):
        loss, _ = RECIPE.robust_loss(ctx, x, y)
        loss.backward()
        assert torch.equal(ctx.state["x"], batches[0][0])  # the first batch, replayed
        deltas.append(ctx.state["delta"].clone())
        assert model.queue.pointer.item() == (4 if step == 2 else 0)  # enqueued after the last replay only
    assert all(d.abs().max().item() <= config.eps + 1e-6 for d in deltas)
    assert deltas[0].abs().max().item() == pytest.approx(config.eps)  # one signed step of size eps from 0
    assert not torch.equal(deltas[0], deltas[1])
    RECIPE.robust_loss(ctx, *batches[3])
    assert torch.equal(ctx.state["x"], batches[3][0]) and ctx.state["replays_left"] == 2
    assert (ctx.state["targets"] != ctx.state["y"]).all()


def test_bad_params_are_config_errors() -> None:
    with pytest.raises(ConfigError):
        RECIPE.config("quick", params={"bank_features": "logits"})
    with pytest.raises(ConfigError):
        RECIPE.config("quick", params={"queue_sise": 10})
    with pytest.raises(ConfigError):
        RECIPE.config("quick", params={"knn_k": 0})


# -- the memory bank and serving -----------------------------------------------------------------


def tiny_train_set(n: int = 20) -> TensorImageDataset:
    x, y = images(n, seed=5)
    return TensorImageDataset((x * 255).to(torch.uint8), y, SPEC.class_names)


def test_memory_bank_builds_in_index_order_and_round_trips(tmp_path) -> None:
    train_set = tiny_train_set()
    bank = build_memory_bank(lambda x: x.flatten(1)[:, :5] + 1.0, train_set, batch_size=6, num_classes=NUM_CLASSES)
    assert bank.features.shape == (20, 5) and bank.features.dtype == torch.float32
    assert torch.allclose(bank.features.norm(dim=1), torch.ones(20))
    assert bank.labels.tolist() == train_set.labels.tolist() and bank.ids.tolist() == list(range(20))
    bank.save(tmp_path / MEMORY_BANK)
    loaded = MemoryBank.load(tmp_path / MEMORY_BANK)
    assert torch.equal(loaded.features, bank.features) and torch.equal(loaded.labels, bank.labels)
    assert torch.equal(loaded.ids, bank.ids) and loaded.num_classes == NUM_CLASSES
    save_tensors(tmp_path / "weights.safetensors", {"w": torch.zeros(2)})
    with pytest.raises(CheckpointError):
        MemoryBank.load(tmp_path / "weights.safetensors")


def test_a_memory_bank_is_current_only_for_the_weights_it_was_built_from(tmp_path) -> None:
    """A bank left beside weights that changed (an ignored, rebuilt file under a zoo entry that a pull updated) once
    served THAT's kNN mode at 65% where its weights give 80%: the bank records its weights, and a stale or unrecorded
    one is rebuilt (``runs.restore_artifacts``)."""
    model = tiny_model().eval()
    config = RECIPE.config("quick", params={"bank_batch_size": 7, "bank_size": 15})
    assert not RECIPE.artifacts_current(model, tmp_path)  # no bank at all
    RECIPE.finish(model, tmp_path, tiny_train_set(), SPEC, config)
    assert memory_bank_source(tmp_path / MEMORY_BANK) == weights_digest(model)
    assert RECIPE.artifacts_current(model, tmp_path)
    with torch.no_grad():
        next(model.clean_encoder.parameters()).add_(0.01)  # the weights change under the bank
    assert not RECIPE.artifacts_current(model, tmp_path)
    MemoryBank.load(tmp_path / MEMORY_BANK).save(tmp_path / MEMORY_BANK)  # as written before banks recorded it
    assert memory_bank_source(tmp_path / MEMORY_BANK) is None and not RECIPE.artifacts_current(model, tmp_path)


def test_modes_give_the_classifier_and_the_knn_vote_over_the_bank(tmp_path) -> None:
    model = tiny_model().eval()
    config = RECIPE.config("quick", params={"knn_k": 4, "bank_batch_size": 7, "bank_size": 15})
    assert list(RECIPE.modes(model)) == ["classifier"]  # during training: no bank yet
    assert list(RECIPE.modes(model, tmp_path)) == ["classifier"]
    train_set = tiny_train_set()
    RECIPE.finish(model, tmp_path, train_set, SPEC, config)
    write_json(tmp_path / DEFENSE_JSON, {"config": dataclasses.asdict(config)})
    bank = MemoryBank.load(tmp_path / MEMORY_BANK)
    assert bank.ids.tolist() == list(range(15))  # bank_size: the first 15 training images
    with torch.no_grad():  # the paper's bank: clean-encoder features of the training images
        assert torch.allclose(bank.features, model.clean_encoder(train_set.images[:15].float() / 255), atol=1e-6)

    modes = RECIPE.modes(model, tmp_path)
    assert tuple(modes) == RECIPE.serving_modes == ("classifier", "knn")
    knn = modes["knn"]
    assert isinstance(knn.module, KNNClassifier) and knn.module.k == 4
    # The classifier head (the paper's transfer attack), the soft vote at three temperatures, the served
    # top-k vote with soft weights and the feature-space pull; Square queries the hard vote itself.
    assert set(knn.attack_surfaces) == {"classifier_head", "soft_knn", "soft_knn_T0.0333", "soft_knn_T0.3",
                                        "top4_soft_knn", "feature_pull"}
    assert knn.attack_surfaces["classifier_head"] is modes["classifier"].module
    assert isinstance(knn.attack_surfaces["soft_knn"], SoftKNN) and knn.attack_surfaces["soft_knn"].temperature == 0.1
    assert knn.attack_surfaces["soft_knn_T0.0333"].temperature == pytest.approx(0.1 / 3)
    assert not knn.differentiable and modes["classifier"].differentiable
    x, _ = images(5, seed=9)
    with torch.no_grad():
        query = RobustFeatures(model.robust)(x)
        assert torch.allclose(knn.module(x), knn_vote(query, bank, 4))
        assert modes["classifier"].module(x).shape == (5, NUM_CLASSES)
    # The surrogate is a smooth vote: a distribution over classes with an input gradient.
    x.requires_grad_(True)
    soft_scores = knn.attack_surfaces["soft_knn"](x)
    assert torch.allclose(soft_scores.log_softmax(1).exp().sum(1), torch.ones(5))
    (grad,) = torch.autograd.grad(soft_scores[:, 0].sum(), x)
    assert grad.abs().sum() > 0


def test_soft_knn_follows_the_nearest_entries_at_low_temperature() -> None:
    bank = hand_bank()
    encoder = nn.Identity()
    query = torch.tensor([[0.8, 0.6], [-0.9, 0.1]])
    soft = SoftKNN(encoder, bank, temperature=0.01)(query)
    # At tau -> 0 all the mass goes to the single nearest entry: classes 1 and 2.
    assert soft.argmax(1).tolist() == [1, 2]
    assert soft.log_softmax(1).exp()[:, [1, 2]].diagonal().tolist() == pytest.approx([1.0, 1.0], abs=1e-3)
    # p_c = sum over class c of softmax(similarity / tau), checked at a moderate tau.
    tau = 0.5
    sims = [0.8, 0.96, 0.6, -0.8]
    z = sum(math.exp(s / tau) for s in sims)
    expected = [math.exp(sims[0] / tau) / z, (math.exp(sims[1] / tau) + math.exp(sims[2] / tau)) / z,
                math.exp(sims[3] / tau) / z]
    assert SoftKNN(encoder, bank, temperature=tau)(query[:1]).softmax(1)[0].tolist() == pytest.approx(expected)


def test_top_k_soft_vote_is_the_log_of_the_served_vote_with_soft_weights() -> None:
    bank = hand_bank()
    query = torch.tensor([[0.8, 0.6], [-0.9, 0.1]], requires_grad=True)
    tau = 0.5
    scores = TopKSoftKNN(nn.Identity(), bank, k=2, temperature=tau)(query)
    votes = knn_vote(query.detach(), bank, 2, temperature=tau)
    present = votes > 0
    # Up to a per-row constant, exp(scores) is the weighted top-2 vote; absent classes are ~0.
    for row in range(2):
        r = scores.detach()[row].exp()[present[row]] / votes[row][present[row]]
        assert torch.allclose(r, r[0].expand_as(r), rtol=1e-4)
        assert scores.detach()[row][~present[row]].max() < -80
    assert scores.argmax(1).tolist() == votes.argmax(1).tolist()
    (grad,) = torch.autograd.grad(scores.log_softmax(1)[:, 0].sum(), query)
    assert grad.abs().sum() > 0 and torch.isfinite(grad).all()


def test_feature_pull_scores_each_class_by_its_nearest_bank_features() -> None:
    bank = hand_bank()
    query = torch.tensor([[0.8, 0.6]], requires_grad=True)
    scores = NearestClassFeatures(nn.Identity(), bank, per_class=2, temperature=0.5)(query)
    # Class 1 holds two entries (similarities 0.96 and 0.6): their mean; classes 0 and 2 hold one each.
    assert scores.detach()[0].tolist() == pytest.approx([0.8 / 0.5, (0.96 + 0.6) / 2 / 0.5, -0.8 / 0.5])
    (grad,) = torch.autograd.grad(scores[0, 0] - scores[0, 1], query)
    assert grad.abs().sum() > 0  # every class has a gradient, not only the voting ones


# -- the paper preset and the pipeline -----------------------------------------------------------


def test_paper_preset_matches_the_paper() -> None:
    config = RECIPE.config("paper")
    # Sec. 4, "Implementation details" (standard AT; the main numbers use ResNet-152, Table 1).
    assert (config.dataset, config.arch) == ("imagefolder", "resnet152")
    assert config.eps == pytest.approx(16 / 255) and config.step_size == pytest.approx(4 / 255)
    assert config.attack_steps == 10
    assert (config.batch_size, config.epochs, config.lr) == (4096, 100, 1.6)
    assert (config.schedule, config.milestones, config.gamma) == ("multistep", [35, 60, 90], 0.1)
    params = config.params
    assert params["queue_size"] == 32768  # Table 6
    assert params["knn_k"] == 50  # Sec. 4.2, Table 3
    assert params["attack_target"] == "random"  # Sec. 4: targeted, uniform random target
    assert (params["nce_weight"], params["contrastive_weight"]) == (1.0, 1.0)  # Algorithm 1, Eq. 7
    assert params["free_replays"] == 0 and params["knn_temperature"] is None  # Eq. 8: similarity weights
    assert params["bank_features"] == "clean" and params["bank_size"] is None  # Sec. 3: all training samples
    assert params["clean_objective"] == "instance"  # MoCo v2 [7]: instance discrimination without labels
    assert [stage.name for stage in RECIPE.stages(config)] == ["clean_encoder", "robust"]
    assert RECIPE.bases == ()


def test_instance_contrastive_loss_matches_hand_computation() -> None:
    views = nn.functional.normalize(torch.randn(6, 4), dim=1)  # rows i and i + 3: two views of image i
    tau = 0.5
    total = 0.0
    for i in range(6):
        twin = (i + 3) % 6
        others = [j for j in range(6) if j != i]
        logits = torch.stack([views[i] @ views[j] / tau for j in others])
        total += -(logits[others.index(twin)] - torch.logsumexp(logits, 0))
    assert instance_contrastive_loss(views, tau).item() == pytest.approx(total.item() / 6, rel=1e-5)
    twins = torch.cat([views[:3], views[:3]])  # each view identical to its twin: the easiest batch there is
    assert instance_contrastive_loss(twins, tau) < instance_contrastive_loss(views, tau)


def test_contrastive_views_are_random_images_in_range() -> None:
    torch.manual_seed(0)
    x = torch.rand(8, 1, 28, 28)
    a, b = contrastive_view(x), contrastive_view(x)
    assert a.shape == x.shape and a.min() >= 0 and a.max() <= 1
    assert not torch.allclose(a, b)  # two draws, two views
