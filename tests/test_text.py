"""Text: PTB data, the LSTM sequence decoder, the latent EBM prior over sentences, the NLL estimator and the text
metrics through the CLI."""
import math

import pytest
import torch
import torch.nn.functional as F
from _data import DATA_ROOT, FIXTURES, tiny_trainer

import lebm_zoo
from datamodules import DatasetNotFoundError, PTBDataModule, Vocabulary
from datamodules.text import pad_batch
from lebm_zoo.cli import main
from lebm_zoo.models.base import DataShapeError
from lebm_zoo.nets import SequenceDecoder

PTB_DIR = DATA_ROOT / "ptb"
PTB_FIXTURE = FIXTURES / "ptb"  # the first 300 / 40 / 40 real lines of each split
FAST = ["--trainer.enable_progress_bar", "false"]


def real_lines(split="train", n=None, folder=PTB_FIXTURE):
    lines = (folder / f"ptb.{split}.txt").read_text().splitlines()
    assert n is None or len(lines) >= n, f"{folder} holds fewer than {n} {split} lines"
    return lines if n is None else lines[:n]


@pytest.fixture
def small_ptb(tmp_path):
    """PTB-format files holding the first real lines of each split."""
    d = tmp_path / "ptb"
    d.mkdir()
    for split, n in (("train", 300), ("valid", 40), ("test", 40)):
        (d / f"ptb.{split}.txt").write_text("\n".join(real_lines(split, n)) + "\n")
    return d


# ------------------------------------------------------------------------------------------------------ data
@pytest.mark.realdata("ptb/ptb.train.txt", "ptb/ptb.valid.txt", "ptb/ptb.test.txt")
def test_real_ptb_sizes_and_roundtrip():
    dm = PTBDataModule(str(PTB_DIR))
    dm.setup()
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (42_068, 3_370, 3_761)
    assert len(dm.vocab) == 10_002 and dm.vocab.itos[:4] == ["<pad>", "<bos>", "<eos>", "<unk>"]
    for line in real_lines("test", 500, folder=PTB_DIR):  # every real test line comes back word for word
        assert dm.vocab.decode(dm.vocab.encode(line.split())) == " ".join(line.split())
    batch = next(iter(dm.test_dataloader()))
    tokens, mask = batch["tokens"], batch["mask"]
    assert tokens.shape == mask.shape and tokens.shape[0] == 32
    assert (tokens[:, 0] == Vocabulary.bos_index).all()
    lengths = mask.sum(1)
    assert (tokens[torch.arange(32), lengths - 1] == Vocabulary.eos_index).all()
    assert (tokens[~mask] == Vocabulary.pad_index).all()


def test_max_length_filter_and_unknown_words(small_ptb):
    dm = PTBDataModule(str(small_ptb), max_length=10)
    dm.setup()
    assert all(len(r) <= 12 for r in dm.train_set.rows)  # <bos> + <= 10 words + <eos>
    assert dm.num_dropped["train"] == sum(len(x.split()) > 10 for x in real_lines("train", 300))
    assert dm.vocab.encode(["zzzz-not-a-word"])[1] == Vocabulary.unk_index


def test_pad_to_gives_every_batch_one_length_and_refuses_shorter_ones(small_ptb):
    """``pad_to`` (for ``capture_step``): every batch ``(B, pad_to)``, the same tokens and mask as without it plus
    trailing padding; a length shorter than a kept sequence is a clear error at ``setup``."""
    plain = PTBDataModule(str(small_ptb), max_length=10)
    padded = PTBDataModule(str(small_ptb), max_length=10, pad_to=14)
    plain.setup()
    padded.setup()
    batches = list(zip(plain.train_dataloader(), padded.train_dataloader()))
    assert len(batches) == len(plain.train_dataloader()) >= 2
    for a, b in batches:
        assert b["tokens"].shape == (a["tokens"].shape[0], 14)
        t = a["tokens"].shape[1]
        assert torch.equal(b["tokens"][:, :t], a["tokens"]) and torch.equal(b["mask"][:, :t], a["mask"])
        assert not b["mask"][:, t:].any() and (b["tokens"][:, t:] == Vocabulary.pad_index).all()
    with pytest.raises(ValueError, match=r"pad_to=11 is shorter than the longest Penn Treebank sequence kept \(12 "
                                         r"tokens with <bos> and <eos>\): raise --data.pad_to to 12, or drop the "
                                         r"longer ones with --data.max_length 9"):
        PTBDataModule(str(small_ptb), max_length=10, pad_to=11).setup()
    for bad in (2, True, 12.0):
        with pytest.raises(ValueError, match="pad_to must be an integer >= 3"):
            PTBDataModule(str(small_ptb), pad_to=bad)
    with pytest.raises(ValueError, match="a row of 4 tokens does not fit the padded length 3"):
        pad_batch([[1, 5, 6, 2]], 0, 3)


def test_missing_or_corrupt_files_are_clear_errors(tmp_path, small_ptb):
    dm = PTBDataModule(str(tmp_path / "nowhere"))
    with pytest.raises(DatasetNotFoundError, match="ptb.train.txt does not exist.*--data.download true"):
        dm.prepare_data()
    (small_ptb / "ptb.test.txt").write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(DatasetNotFoundError, match="ptb.test.txt is not readable UTF-8"):
        PTBDataModule(str(small_ptb)).setup()


# ----------------------------------------------------------------------------------------------------- decoder
def test_decoder_log_likelihood_matches_a_hand_computation():
    torch.manual_seed(0)
    dec = SequenceDecoder(vocab_size=6, nz=3, emb_dim=4, hidden=5).eval()
    z = torch.randn(2, 3)
    tokens = torch.tensor([[1, 4, 5, 4, 2], [1, 5, 2, 0, 0]])
    mask = tokens != 0
    got = dec.log_likelihood(tokens, mask, z)

    # the LSTM equations by hand (gates i, f, g, o), z in the initial state and at every step
    lstm = dec.lstm
    w_ih, w_hh, b = lstm.weight_ih_l0, lstm.weight_hh_l0, lstm.bias_ih_l0 + lstm.bias_hh_l0
    for row in range(2):
        hc = torch.tanh(dec.init_state(z[row]))
        h, c = hc[:5], hc[5:]
        total = 0.0
        for t in range(int(mask[row].sum()) - 1):
            inp = torch.cat([dec.embedding.weight[tokens[row, t]], z[row]])
            i, f, g, o = (w_ih @ inp + w_hh @ h + b).chunk(4)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(c)
            probs = F.softmax(dec.out(h), dim=0)
            total += math.log(float(probs[tokens[row, t + 1]].detach()))
        assert float(got[row].detach()) == pytest.approx(total, abs=1e-5)


def test_decoder_generation_greedy_is_deterministic_and_stops_at_eos():
    torch.manual_seed(1)
    dec = SequenceDecoder(vocab_size=8, nz=2, emb_dim=4, hidden=8).eval()
    z = torch.randn(5, 2)
    a, ma = dec.generate(z, 5, max_length=12, temperature=0.0)
    b, mb = dec.generate(z, 5, max_length=12, temperature=0.0)
    assert torch.equal(a, b) and torch.equal(ma, mb)
    assert (a[:, 0] == 1).all() and not ((a[:, 1:] == 0) & mb[:, 1:]).any()  # never <pad> inside a sequence
    for row, m in zip(a, ma):
        ends = (row[m] == 2).nonzero()
        assert len(ends) <= 1 and (len(ends) == 0 or int(ends[0]) == int(m.sum()) - 1)  # <eos> is the last token


# ------------------------------------------------------------------------------------------------------- model
def test_nll_estimator_matches_exact_log_marginal_by_quadrature():
    """nz = 1: log p(x) = log int p(x|z) exp(-E(z)) N(z) dz - log int exp(-E(z)) N(z) dz, on a fine grid."""
    torch.manual_seed(0)
    vocab = ["a", "b", "c"]
    m = lebm_zoo.SequenceLatentEBMPrior(vocab=Vocabulary(vocab).to_list(), nz=1, ndf=16, emb_dim=8, hidden=8,
                                        posterior_steps=30, posterior_step_size=0.2).eval()
    with torch.no_grad():  # a non-Gaussian prior (log Z = -0.52, not 0) and a decoder that depends on z
        m.energy_net.net[-1].weight.mul_(5)
        m.generator.init_state.weight.mul_(4)
    x = m.encode(["a b", "c", "b b c a"])
    grid = torch.linspace(-8, 8, 8001)[:, None]
    with torch.no_grad():
        log_w = -m.energy(grid) - grid[:, 0] ** 2 / 2  # (G,)
        log_norm = torch.logsumexp(log_w, 0)
        exact = []
        for i in range(3):
            xi = {k: v[i:i + 1].expand(len(grid), -1) for k, v in x.items()}
            exact.append(torch.logsumexp(m.log_likelihood(xi, grid) + log_w, 0) - log_norm)
    exact = torch.stack(exact)
    torch.manual_seed(1)
    log_z = m.log_normalizer(200_000)
    est = m.log_marginal(x, n_samples=2000, log_z=log_z)
    assert torch.allclose(est, exact, atol=0.05), (est, exact)
    # the estimate is a proper likelihood: below 0, and the prior's normaliser matters
    assert (est < 0).all() and abs(float(log_z)) > 0.1


def test_model_trains_samples_words_and_round_trips_a_checkpoint(small_ptb, tmp_path):
    import pytorch_lightning as pl

    dm = PTBDataModule(str(small_ptb), batch_size=16)
    m = lebm_zoo.SequenceLatentEBMPrior(nz=4, ndf=16, emb_dim=16, hidden=16, prior_steps=5, posterior_steps=5,
                                        max_decode_length=15)
    trainer = pl.Trainer(max_steps=3, logger=False, default_root_dir=tmp_path, enable_progress_bar=False,
                         limit_val_batches=0, enable_model_summary=False)
    trainer.fit(m, dm)
    assert m.global_step == 3 and m.hparams.vocab == dm.vocab.to_list()
    words = set(dm.vocab.itos[4:]) | {"<unk>"}
    texts = m.sample(8)
    assert len(texts) == 8 and all(isinstance(t, str) for t in texts)
    assert all(w in words for t in texts for w in t.split())
    path = tmp_path / "m.ckpt"
    trainer.save_checkpoint(path)
    loaded = lebm_zoo.load_pretrained(str(path))
    assert isinstance(loaded, lebm_zoo.SequenceLatentEBMPrior)
    x = pad_batch(dm.test_set.rows[:4])
    torch.manual_seed(0)
    a = m.eval().log_joint(x, torch.zeros(4, 4))
    assert torch.allclose(a, loaded.log_joint(x, torch.zeros(4, 4)))
    assert all(w in words for t in loaded.sample(4, temperature=0.0) for w in t.split())
    # a datamodule with another vocabulary is refused
    other = small_ptb.parent / "other"
    other.mkdir()
    for split in ("train", "valid", "test"):
        (other / f"ptb.{split}.txt").write_text("completely different words\n")
    with pytest.raises(DataShapeError, match="vocabulary"):
        pl.Trainer(max_steps=1, logger=False, enable_progress_bar=False, default_root_dir=tmp_path).fit(
            loaded.train(), PTBDataModule(str(other)))


def test_posterior_gradient_flows_through_the_decoder():
    """The posterior chain's drift is the gradient of log p(x, z) through the decoder: without noise it ascends."""
    torch.manual_seed(0)
    m = lebm_zoo.SequenceLatentEBMPrior(vocab=Vocabulary(["a", "b", "c", "d"]).to_list(), nz=2, ndf=8,
                                        emb_dim=8, hidden=8, posterior_steps=60, posterior_step_size=0.1).eval()
    with torch.no_grad():
        m.generator.init_state.weight.mul_(5)
    m.samplers["posterior"] = lebm_zoo.LangevinSampler(60, 0.1, noise_scale=0.0)
    x = m.encode(["a a b c d d"] * 64)
    z0 = 2 * torch.randn(64, 2)
    z = m.infer_latent(x, z0=z0)
    with torch.no_grad():
        gain = m.log_joint(x, z) - m.log_joint(x, z0)
        assert (gain > 0).all() and gain.mean() > 0.5
        assert (m.log_likelihood(x, z) - m.log_likelihood(x, z0)).mean() > 0  # the decoder term contributes


# --------------------------------------------------------------------------------------------------------- CLI
def test_ptb_recipes_train_and_test_print_the_text_metrics(small_ptb, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    lm_args = ["fit", "--recipe", "ptb_lm", "--data.data_dir", str(small_ptb), "--trainer.max_steps", "3",
               "--trainer.default_root_dir", str(tmp_path / "lm"), "--model.emb_dim", "16", "--model.hidden", "16",
               *FAST]
    assert main(lm_args) == 0, capsys.readouterr().err
    prior = ["--recipe", "ptb_prior", "--data.data_dir", str(small_ptb), "--data.batch_size", "16",
             "--trainer.default_root_dir", str(tmp_path / "prior"), "--model.nz", "4", "--model.emb_dim", "16",
             "--model.hidden", "16", "--model.ndf", "16", "--model.prior_steps", "5", "--model.posterior_steps",
             "5", "--model.max_decode_length", "20", *FAST]
    assert main(["fit", *prior, "--trainer.max_steps", "2"]) == 0, capsys.readouterr().err
    capsys.readouterr()
    ckpt = next((tmp_path / "prior").rglob("last.ckpt"))
    code = main(["test", *prior, "--ckpt_path", str(ckpt), "--trainer.callbacks.init_args.num_samples", "40",
                 "--trainer.callbacks.init_args.rppl_epochs", "1", "--trainer.callbacks.init_args.nll_samples", "5",
                 "--trainer.callbacks.init_args.nll_sentences", "8",
                 "--trainer.callbacks.init_args.log_z_samples", "1000"])
    out = capsys.readouterr()
    assert code == 0, out.err
    for metric in ("test/fppl", "test/rppl", "test/nll"):
        assert metric in out.out
    samples = next((tmp_path / "prior").rglob("samples.txt")).read_text().splitlines()
    assert len(samples) == 40
    assert next((tmp_path / "prior").rglob("prior_chain_energy.png")).stat().st_size > 1000


def test_missing_language_model_is_a_clear_error(small_ptb, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    from lebm_zoo.callbacks import PerplexityCallback
    from lebm_zoo.pretrained import CheckpointError

    class T:
        default_root_dir = str(tmp_path)

    with pytest.raises(CheckpointError, match="'my_lm' is neither a file nor the name of a recipe"):
        PerplexityCallback(lm_path="my_lm").resolve_lm_path(T())
    # no run of the ptb_lm recipe here: the shipped ptb-lm is used (and a shipped name is taken as it is)
    assert PerplexityCallback(lm_path="ptb_lm").resolve_lm_path(T()) == "ptb-lm"
    assert PerplexityCallback(lm_path="ptb-lm").resolve_lm_path(T()) == "ptb-lm"


def test_bf16_mixed_trains_with_fp32_state_and_matches_fp32_likelihood(small_ptb, tmp_path):
    """bf16 rounds logits to 8 significant bits (relative 2^-9 each); over a sentence's ~20 token log-probabilities
    of ~-9 nats the errors partly cancel, so a 1e-2 relative bound on log p(x | z) is loose but still catches a
    network that silently runs in the wrong precision or a chain state kept in bf16."""
    dm = PTBDataModule(str(small_ptb), batch_size=16)
    torch.manual_seed(0)
    m = lebm_zoo.SequenceLatentEBMPrior(nz=4, ndf=16, emb_dim=16, hidden=16, prior_steps=3, posterior_steps=3)
    t = tiny_trainer(tmp_path, precision="bf16-mixed", max_steps=2, limit_val_batches=0)
    t.fit(m, dm)
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in m.parameters())
    states = [v for opt in t.optimizers for s in opt.state.values() for v in s.values() if v.is_floating_point()]
    assert states and all(v.dtype == torch.float32 for v in states)
    x = pad_batch(dm.test_set.rows[:16])
    z = torch.randn(16, 4)
    with torch.no_grad():
        ref = m.log_likelihood(x, z)
        with torch.autocast("cpu", torch.bfloat16):
            low = m.log_likelihood(x, z)
            z_bf = m.infer_latent(x)
    assert low.dtype == torch.float32 and z_bf.dtype == torch.float32
    assert ((low - ref).abs() / ref.abs()).max() < 1e-2
