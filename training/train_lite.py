"""Regenerate a2e-lite's training data and train it from scratch, on the CPU.

    sudo bash training/setup.sh                  # espeak-ng, MBROLA voices, word lists (once)
    python -m training.train_lite --out pretrained_models/a2e-lite.safetensors

Data: random sentences from word lists (kana for Japanese, tonal pinyin for
Mandarin) spoken by MBROLA and espeak-ng voices at random rates and
pitches, with exact phoneme timing -> viseme targets (training/targets.py).
Some voices and whole languages are held out for evaluation. Training
crops fixed 64-frame windows (the streaming contract), some zero-padded at
the start as a session's first chunk is, augments them (training/augment.py)
and gives each a random identity with its style. A fixed seed gives the
same weights (same machine, same thread count).
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from a2e.constants import channel_index
from a2e.lite import A2ELite, LiteDims, save_lite

from . import augment, synth, targets

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "training" / "out"

# (language, synthesiser, voice): "mb" voices through MBROLA, "es" through espeak-ng's library
TRAIN_VOICES = [
    ("en", "mb", "us1"), ("en", "mb", "us2"), ("en", "mb", "en1"), ("en", "es", "en-us"),
    ("de", "mb", "de1"), ("de", "mb", "de2"), ("de", "es", "de"),
    ("fr", "mb", "fr1"), ("fr", "es", "fr"),
    ("es", "mb", "es1"), ("es", "mb", "mx1"), ("es", "es", "es"),
    ("ja", "mb", "jp1"), ("ja", "mb", "jp2"),
    ("zh", "es", "cmn-latn-pinyin"),
]  # fmt: skip
HELD_OUT_VOICES = [("en", "mb", "us3"), ("de", "mb", "de4"), ("fr", "mb", "fr4"), ("es", "mb", "es2"), ("ja", "mb", "jp3")]
HELD_OUT_LANGUAGES = [("it", "mb", "it3"), ("nl", "mb", "nl2"), ("pt", "mb", "pt1")]
WINDOW_FRAMES, WINDOW_SAMPLES = 64, 34133
PAD_FRAMES = 60  # silence around each utterance, so windows can start before and end after speech
MOUTH = [channel_index(n) for n in targets.ARKIT_NAMES if n.startswith(("mouth", "jaw", "cheekPuff", "tongue", "nose"))]


@dataclass
class Item:
    audio: np.ndarray  # padded with PAD_FRAMES of silence at both ends
    target: np.ndarray  # [frames, 52] neutral targets, padded likewise
    phonemes: list
    language: str
    voice: str


def build(voices, n: int, seed: int, words_cache: dict, mp3_share: float = 0.2) -> list[Item]:
    rng = random.Random(seed)
    nrng = np.random.default_rng(seed)
    lib = synth.EspeakLibrary()
    items = []
    pad = PAD_FRAMES // 3 * 1600
    while len(items) < n:
        lang, kind, voice = voices[len(items) % len(voices)]
        if lang not in words_cache and lang in synth.WORDLISTS:
            words_cache[lang] = synth.load_words(lang)
        text = synth.sentence(lang, rng, words_cache.get(lang), rng.randint(3, 12))
        speed, pitch = rng.randint(110, 230), rng.randint(20, 80)
        u = (
            synth.mbrola_utterance(voice, text, lang, speed, pitch)
            if kind == "mb"
            else lib.utterance(voice, text, lang, speed, pitch)
        )
        if u is None or len(u.audio) < 8000 or not np.isfinite(u.audio).all():
            continue
        audio = u.audio / max(1e-3, float(np.abs(u.audio).max())) * 0.7
        target = targets.neutral_targets(u.phonemes, audio)
        if nrng.random() < mp3_share:
            audio = augment.mp3_round_trip(audio, nrng)
        audio = np.concatenate([np.zeros(pad, np.float32), audio, np.zeros(pad, np.float32)])
        zeros = np.zeros((PAD_FRAMES, target.shape[1]), np.float32)
        shifted = [(s, a + pad / 16000, b + pad / 16000) for s, a, b in u.phonemes]
        items.append(Item(audio, np.concatenate([zeros, target, zeros]), shifted, lang, u.voice))
    return items


def sample_batch(items: list[Item], batch: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    audio = np.zeros((batch, WINDOW_SAMPLES), np.float32)
    tgt = np.zeros((batch, WINDOW_FRAMES, 52), np.float32)
    ids = rng.integers(0, 12, batch)
    for b in range(batch):
        it = items[rng.integers(len(items))]
        frames = len(it.target)
        f0 = 3 * int(rng.integers(0, max(1, (frames - WINDOW_FRAMES) // 3)))  # 3 frames = 1600 samples exactly
        s0 = f0 // 3 * 1600
        piece = it.audio[s0 : s0 + WINDOW_SAMPLES]
        win = np.zeros(WINDOW_SAMPLES, np.float32)
        win[: len(piece)] = piece
        t = targets.apply_style(it.target[f0 : f0 + WINDOW_FRAMES], int(ids[b]))
        if rng.random() < 0.15:  # a session's first chunk: zeros, then the chunk
            keep = int(rng.integers(10, 60))
            cut = WINDOW_SAMPLES - round(keep * 16000 / 30)
            win[:cut] = 0
            t[: WINDOW_FRAMES - keep] = targets.apply_style(np.zeros_like(t[: WINDOW_FRAMES - keep]), int(ids[b]))
        audio[b] = augment.augment(win, rng)
        tgt[b, : len(t)] = t
    return audio, tgt, ids


def loss_fn(pred: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
    """Squared error (its optimum is the conditional mean: an L1 loss's median
    would be 0 for sparse channels like mouthClose), mouth channels weighted
    up, plus the error of frame-to-frame motion."""
    weight = torch.ones(52)
    weight[MOUTH] = 3.0
    err = (((pred - tgt) ** 2) * weight).mean()
    vel = (((pred[:, 1:] - pred[:, :-1]) - (tgt[:, 1:] - tgt[:, :-1])) ** 2).mean()
    return 10.0 * (err + 2.0 * vel)


@torch.inference_mode()
def evaluate(model: A2ELite, items: list[Item]) -> dict:
    """Per-channel correlation with the (neutral-style) targets, and articulation checks."""
    preds, tgts = [], []
    close, jaw, silent = {"PP": [], "vowel": []}, {"aa": [], "IU": []}, []
    ci_close, ci_jaw = channel_index("mouthClose"), channel_index("jawOpen")
    for it in items:
        x = torch.from_numpy(it.audio)[None]
        p = model(x, F.one_hot(torch.tensor([0]), 12).float())[0].numpy()
        t = targets.apply_style(it.target, 0)
        n = min(len(p), len(t))
        preds.append(p[:n])
        tgts.append(t[:n])
        for sym, a, b in it.phonemes:
            f = int(round(((a + b) / 2 - targets.LEAD_S) * 30))
            if not 0 <= f < n:
                continue
            vis = targets.visemes_of(sym)[0]
            if vis == "PP":
                close["PP"].append(p[f, ci_close])
            elif vis in ("aa", "E", "I", "O", "U"):
                close["vowel"].append(p[f, ci_close])
            if vis == "aa":
                jaw["aa"].append(p[f, ci_jaw])
            elif vis in ("I", "U"):
                jaw["IU"].append(p[f, ci_jaw])
        silent.append(np.abs(p[: PAD_FRAMES - 10][:, MOUTH]).mean())
    P, T = np.concatenate(preds), np.concatenate(tgts)
    corr = {}
    for c in range(52):
        if T[:, c].std() > 0.01:
            corr[targets.ARKIT_NAMES[c]] = float(np.corrcoef(P[:, c], T[:, c])[0, 1])
    return {
        "mean_corr": float(np.mean(list(corr.values()))),
        "corr_jawOpen": corr.get("jawOpen"),
        "corr": corr,
        "mouthClose_at_bilabials": float(np.mean(close["PP"])),
        "mouthClose_at_vowels": float(np.mean(close["vowel"])),
        "jawOpen_at_open_vowels": float(np.mean(jaw["aa"])),
        "jawOpen_at_i_u": float(np.mean(jaw["IU"])),
        "mouth_in_silence": float(np.mean(silent)),
        "l1": float(np.abs(P - T).mean()),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=ROOT / "pretrained_models" / "a2e-lite.safetensors")
    p.add_argument("--utterances", type=int, default=4000)
    p.add_argument("--steps", type=int, default=4000)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    OUT.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    words: dict = {}
    train = build(TRAIN_VOICES, args.utterances, args.seed, words)
    held_voices = build(HELD_OUT_VOICES, 100, args.seed + 1, words)
    held_langs = build(HELD_OUT_LANGUAGES, 60, args.seed + 2, words)
    hours = sum(len(i.audio) for i in train) / 16000 / 3600
    print(f"data: {len(train)} utterances ({hours:.2f} h) in {time.time() - t0:.0f} s", flush=True)

    model = A2ELite(LiteDims())
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=args.steps, pct_start=max(0.05, 2 / args.steps))
    rng = np.random.default_rng(args.seed)
    t1 = time.time()
    for step in range(1, args.steps + 1):
        audio, tgt, ids = sample_batch(train, args.batch, rng)
        pred = model(torch.from_numpy(audio), F.one_hot(torch.from_numpy(ids), 12).float())
        loss = loss_fn(pred, torch.from_numpy(tgt))
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 200 == 0 or step == 1:
            print(f"step {step:5d} loss {loss.item():.4f} ({time.time() - t1:.0f} s)", flush=True)
    model.eval()
    report = {
        "held_out_voices": evaluate(model, held_voices),
        "held_out_languages": evaluate(model, held_langs),
        "train_sample": evaluate(model, train[:100]),
        "data_hours": hours,
        "utterances": len(train),
        "steps": args.steps,
        "seed": args.seed,
        "train_seconds": time.time() - t1,
    }
    for k in ("held_out_voices", "held_out_languages", "train_sample"):
        r = report[k]
        print(
            f"{k:20} mean corr {r['mean_corr']:.3f} jawOpen {r['corr_jawOpen']:.3f} close@pbm {r['mouthClose_at_bilabials']:.3f} "
            f"close@vowels {r['mouthClose_at_vowels']:.3f} jaw@a {r['jawOpen_at_open_vowels']:.3f} jaw@i/u {r['jawOpen_at_i_u']:.3f} "
            f"silence {r['mouth_in_silence']:.4f}"
        )
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = "unknown"
    save_lite(model, args.out, {"seed": str(args.seed), "steps": str(args.steps), "commit": commit})
    (OUT / "eval.json").write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out} and {OUT / 'eval.json'} in {time.time() - t0:.0f} s total")


if __name__ == "__main__":
    main()
