"""What routing costs: IDP's cached one-pass routing plus the chosen prompt's forward, against a single
prompted forward (the prompt prepended as embeddings), on the same inputs. Runs on the CPU or a GPU.

Inputs are the first `--examples` ARC-Easy questions (contexts as `eval` builds them) in batches of
`--batch`; the bank holds `--prompts` random prompts of `--length` vectors at the embeddings' scale.
Times are medians over `--repeats` runs of the whole set after one warm-up run. Writes a markdown
section to --out (default: stdout).
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import sys
import time

import torch


def _questions(data_dir: str, n: int) -> list[str]:
    from rechannel.ops.evaluation.tasks import get_tasks

    task = get_tasks("arc_easy")[0]
    return [ex.contexts[0] for ex in task.load(data_dir)[:n]]


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _median_seconds(fn, repeats: int, device: str) -> float:
    fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


@torch.inference_mode()
def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--data", default="../shared/data")
    p.add_argument("--device", default="auto")
    p.add_argument("--examples", type=int, default=64)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--length", type=int, default=16)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default="-")
    args = p.parse_args()

    from rechannel.ops.core.batching import pad_rows
    from rechannel.ops.core.blocks import decoder_blocks
    from rechannel.ops.core.models import load_model
    from rechannel.ops.recover.routing import bank_kv, parse_layers, prompted_logits, route

    lm = load_model(args.model, device=args.device)
    model, tok = lm.model, lm.tokenizer
    device = str(model.device)
    embed = model.get_input_embeddings()
    torch.manual_seed(0)
    bank = torch.randn(args.prompts, args.length, embed.weight.shape[1]) * embed.weight.float().std().item()
    rows = [tok(q, add_special_tokens=False).input_ids for q in _questions(args.data, args.examples)]
    batches = []
    for i in range(0, len(rows), args.batch):
        chunk = rows[i:i + args.batch]
        batches.append(pad_rows(chunk, max(len(r) for r in chunk), tok.pad_token_id or 0))
    n_layers = len(decoder_blocks(model))

    def single():  # one prompt prepended as input embeddings, the whole forward
        soft = bank[0].to(device, embed.weight.dtype)
        for ids, mask in batches:
            x = torch.cat([soft.expand(len(ids), -1, -1), embed(ids.to(device))], 1)
            m = torch.cat([torch.ones(len(ids), args.length, dtype=mask.dtype), mask], 1).to(device)
            model(inputs_embeds=x, attention_mask=m, use_cache=False)

    def idp(layers, by="attention"):
        def run():
            kv = bank_kv(model, bank)  # once per bank: counted here, though a server would keep it
            for ids, mask in batches:
                chosen, _ = route(model, kv, ids, mask, by, layers)
                prompted_logits(model, kv, chosen, ids, mask)
        return run

    cases = [("single prompt, prepended (reference)", single)]
    for name in ("first", "all"):
        layers = parse_layers(name, n_layers)
        cases.append((f"IDP attention, --layers {name} ({len(layers)} of {n_layers}) + chosen prompt", idp(layers)))
    cases.append(("entropy routing + chosen prompt", idp([0], "entropy")))
    times = [(name, _median_seconds(fn, args.repeats, device)) for name, fn in cases]
    ref = times[0][1]
    tokens = sum(int(m.sum()) for _, m in batches)
    when = datetime.date.today().isoformat()
    where = torch.cuda.get_device_name() if device.startswith("cuda") else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    lines = [f"## Routing cost — {where}, {when}", "",
             f"{args.model}, {len(rows)} ARC-Easy questions ({tokens} tokens) in batches of {args.batch}, a bank of "
             f"{args.prompts} prompts of {args.length}; median of {args.repeats} runs after a warm-up.", "",
             "| path | seconds | ratio to a single prompted forward |", "|---|---:|---:|"]
    lines += [f"| {name} | {t:.3f} | {t / ref:.2f}x |" for name, t in times]
    text = "\n".join(lines) + "\n"
    if args.out == "-":
        sys.stdout.write(text)
    else:
        with open(args.out, "a") as f:
            f.write(text + "\n")
        sys.stdout.write(text)


if __name__ == "__main__":
    main()
