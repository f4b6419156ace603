"""Train small LoRA adapters with a behaviour visible in the output, for the default model, on its own answers.

1. The engine answers chat-templated ShareGPT questions greedily (from `skip_prompts` on: the benchmarks and the
   other trainers use the first few thousand), briefly (`answer_tokens`).
2. Each answer becomes the target of each behaviour: uppercase (the answer up to its last complete sentence or
   line, in capitals), json (`{"answer": "<its first sentence>"}`), one_sentence (its first sentence).
3. A PEFT LoRA adapter per behaviour is trained on transformers (same weights as the engine: the GGUF file) with
   the loss on the target tokens only, and saved in PEFT format (what the engine serves), with a record of the
   training (training.json).
4. Held-out questions (after the training ones) are answered in one mixed batch by the base model and every
   adapter; the share of answers showing each behaviour is recorded, with a sample.

`foreseer lora train` runs it; the shipped adapters live in foreseer/lora/weights (see its README.md).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from foreseer.bench.data import DEFAULT_DATASET, chat_prompt_ids, load_sharegpt_turns
from foreseer.commands import args_dataclass
from foreseer.lora.shipped import DEFAULT_MODEL, SHIPPED, WEIGHTS_DIR
from foreseer.training.finetune import FinetuneConfig, end_token, finetune

TRAINING_FILE = "training.json"


# -- behaviours ---------------------------------------------------------------------------------------------------

_END = re.compile(r"[.!?]+[\"')\]]*(?=\s|$)")
_ABBREVIATIONS = {"e.g", "i.e", "etc", "vs", "mr", "mrs", "ms", "dr", "st", "no", "fig", "approx", "inc", "jr", "sr"}


def split_sentences(text: str) -> tuple[list[str], str]:
    """(complete sentences, the unfinished rest) of one line of text (whitespace collapsed). A period after a
    number (a list item, "1.") or a common abbreviation does not end a sentence."""
    text = " ".join(text.split())
    sentences, start = [], 0
    for match in _END.finditer(text):
        word = text[start:match.start()].rsplit(" ", 1)[-1].lower()
        if text[match.start()] == "." and (not word or word.isdigit() or word in _ABBREVIATIONS):
            continue
        sentences.append(text[start:match.end()].strip())
        start = match.end()
    return sentences, text[start:].strip()


def first_sentence(answer: str, min_chars: int = 20, max_chars: int = 250) -> str | None:
    """The first sentence of the answer's first line, if that line has a complete one of a sensible length that
    is prose (no markdown heading, list, table or code)."""
    line = next((line for line in answer.strip().splitlines() if line.strip()), "")
    sentences, _ = split_sentences(line)
    if not sentences:
        return None
    sentence = sentences[0]
    if not min_chars <= len(sentence) <= max_chars or re.match(r"[#*\-|>`\d]", sentence) or "```" in sentence:
        return None
    return sentence


def complete_part(answer: str, finished: bool, max_chars: int = 200) -> str | None:
    """The answer's complete lines, and complete sentences of the line after them, within `max_chars` and before
    any code block (the last line of an answer cut at its token limit is not complete); None if nothing is left."""
    lines = answer.strip().split("\n")
    kept, length = [], 0
    for i, line in enumerate(lines):
        if line.lstrip().startswith("```"):  # prose only: code stops it
            break
        whole = finished or i < len(lines) - 1
        if whole and length + len(line) <= max_chars:
            kept.append(line)
            length += len(line) + 1
            continue
        part = ""
        for sentence in split_sentences(line)[0]:
            if length + len(part) + len(sentence) + 1 > max_chars:
                break
            part = f"{part} {sentence}".strip()
        kept.append(part)
        break
    return "\n".join(kept).strip() or None


def is_uppercase(text: str) -> bool:
    """Letters, and none of them lower case."""
    return any(c.isupper() for c in text) and not any(c.islower() for c in text)


def is_json_answer(text: str) -> bool:
    """A JSON object with a non-empty string "answer"."""
    try:
        value = json.loads(text.strip())
    except ValueError:
        return False
    return isinstance(value, dict) and isinstance(value.get("answer"), str) and bool(value["answer"].strip())


def is_one_sentence(text: str) -> bool:
    """One complete sentence on one line, nothing else."""
    if "\n" in text.strip():
        return False
    sentences, rest = split_sentences(text)
    return len(sentences) == 1 and not rest


@dataclass(frozen=True)
class Behaviour:
    name: str
    description: str
    target: Callable[[str, bool], str | None]  # (base answer, it finished) -> the training target, or None
    check: Callable[[str], bool]  # does an answer show the behaviour


def _uppercase_target(answer: str, finished: bool) -> str | None:
    part = complete_part(answer, finished)
    return part.upper() if part and first_sentence(answer) else None


def _json_target(answer: str, finished: bool) -> str | None:
    sentence = first_sentence(answer)
    return None if sentence is None else json.dumps({"answer": sentence}, ensure_ascii=False)


def _one_sentence_target(answer: str, finished: bool) -> str | None:
    return first_sentence(answer)


BEHAVIOURS = {
    "uppercase": Behaviour("uppercase", "answers in ALL UPPERCASE", _uppercase_target, is_uppercase),
    "json": Behaviour("json", 'answers as a JSON object {"answer": "..."} holding one sentence', _json_target,
                      is_json_answer),
    "one_sentence": Behaviour("one_sentence", "answers in one sentence", _one_sentence_target, is_one_sentence),
}


def is_english(text: str, min_ascii: float = 0.95) -> bool:
    return bool(text) and sum(c.isascii() for c in text) / len(text) >= min_ascii


# -- data ---------------------------------------------------------------------------------------------------------


@dataclass
class AnswerRecord:
    index: int  # of the question in the dataset's usable questions
    question: str
    answer: str  # the base model's greedy answer
    finished: bool  # it ended by itself (not at answer_tokens)


def generate_answers(llm, questions: Sequence[tuple[int, str]], answer_tokens: int, max_prompt_tokens: int,
                     batch: int = 64, log=print) -> list[AnswerRecord]:
    from foreseer.sampling_params import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=answer_tokens)
    records = []
    for start in range(0, len(questions), batch):
        chunk = questions[start:start + batch]
        prompts = [chat_prompt_ids(llm.tokenizer, q, max_prompt_tokens) for _, q in chunk]
        for (index, question), out in zip(chunk, llm.generate(prompts, params, use_tqdm=False)):
            if out.error:
                continue
            completion = out.outputs[0]
            records.append(AnswerRecord(index, question, completion.text, completion.finish_reason == "stop"))
        if log is not None:
            log(f"answered {len(records)}/{len(questions)} questions")
    return records


def usable(record: AnswerRecord, behaviours: Sequence[Behaviour]) -> bool:
    return is_english(record.question) and is_english(record.answer) and all(
        b.target(record.answer, record.finished) is not None for b in behaviours)


# -- training -----------------------------------------------------------------------------------------------------


def training_examples(tokenizer, records: Sequence[AnswerRecord], behaviour: Behaviour,
                      max_prompt_tokens: int) -> list[tuple[list[int], list[int]]]:
    """(chat prompt, target + end of turn) token ids of every record the behaviour can use."""
    end = end_token(tokenizer)
    examples = []
    for record in records:
        target = behaviour.target(record.answer, record.finished)
        if target is not None:
            prompt = chat_prompt_ids(tokenizer, record.question, max_prompt_tokens)
            examples.append((prompt, tokenizer.encode(target, add_special_tokens=False) + [end]))
    return examples


def load_hf_model(model: str):
    """The model in transformers (float32, eval mode), from the GGUF file or HF directory the engine uses."""
    from transformers import AutoModelForCausalLM

    from foreseer.models.loader import resolve_model

    source = resolve_model(model)
    kwargs = {"gguf_file": os.path.basename(source.path)} if source.is_gguf else {}
    path = source.directory if source.is_gguf else source.path
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kwargs).eval()


# -- evaluation ---------------------------------------------------------------------------------------------------


def evaluate(llm, questions: Sequence[str], adapters: dict[str, str], answer_tokens: int,
             max_prompt_tokens: int) -> dict:
    """Every question answered by the base model and by each adapter, all in one mixed batch; per adapter (and
    for the base model, per behaviour) the share of answers showing each behaviour, and the answers."""
    from foreseer.lora.request import LoRARequest
    from foreseer.sampling_params import SamplingParams

    prompts = [chat_prompt_ids(llm.tokenizer, q, max_prompt_tokens) for q in questions]
    requests = {None: None} | {name: LoRARequest(name, i + 1, path) for i, (name, path) in enumerate(adapters.items())}
    batch_prompts, batch_loras = [], []
    for lora in requests.values():
        batch_prompts += prompts
        batch_loras += [lora] * len(prompts)
    outputs = llm.generate(batch_prompts, SamplingParams(temperature=0, max_tokens=answer_tokens), use_tqdm=False,
                           lora_request=batch_loras)
    texts = [out.outputs[0].text for out in outputs]
    answers = {name: texts[i * len(prompts):(i + 1) * len(prompts)] for i, name in enumerate(requests)}
    report = {"base": {name: sum(map(BEHAVIOURS[name].check, answers[None])) / len(prompts) for name in adapters}}
    for name in adapters:
        report[name] = sum(map(BEHAVIOURS[name].check, answers[name])) / len(prompts)
    return {"num_questions": len(prompts), "behaviour_rate": report,
            "answers": {("base" if k is None else k): v for k, v in answers.items()}}


# -- the command --------------------------------------------------------------------------------------------------


@dataclass
class TrainArgs:
    model: str = DEFAULT_MODEL
    dataset: str = DEFAULT_DATASET
    behaviours: list[str] = field(default_factory=lambda: list(BEHAVIOURS))
    num_examples: int = 192
    skip_prompts: int = 4000
    eval_prompts: int = 16
    max_prompt_tokens: int = 128
    answer_tokens: int = 64
    rank: int = 8
    alpha: int = 16
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    dropout: float = 0.05
    epochs: int = 2
    lr: float = 2e-3
    batch_size: int = 8
    seed: int = 0
    threads: int | None = None
    kv_cache_gib: float | None = 0.5
    data: str | None = None  # JSON of the base model's answers: reused if it matches, else written
    output_dir: str | None = None  # default: WEIGHTS_DIR (directories named as SHIPPED for the default model)
    output_json: str | None = None
    command: str = ""


def adapter_dir(output_dir: str, model: str, behaviour: str) -> str:
    names = SHIPPED.get(model, {})
    return os.path.join(output_dir, names.get(behaviour, behaviour))


def _data_settings(args: TrainArgs) -> dict:
    return {"model": args.model, "dataset": os.path.basename(args.dataset), "skip_prompts": args.skip_prompts,
            "answer_tokens": args.answer_tokens, "max_prompt_tokens": args.max_prompt_tokens}


def collect_data(llm, args: TrainArgs, behaviours: Sequence[Behaviour], log=print) -> tuple[list[AnswerRecord],
                                                                                            list[tuple[int, str]]]:
    """Training records (usable by every behaviour) and held-out questions (after them), from the cache file if
    it matches the settings."""
    settings = _data_settings(args)
    if args.data and os.path.isfile(args.data):
        with open(args.data) as f:
            cached = json.load(f)
        if cached.get("settings") == settings:
            records = [AnswerRecord(**r) for r in cached["records"]]
            good = [r for r in records if usable(r, behaviours)]
            if len(good) >= args.num_examples:
                log(f"read {len(records)} answers from {args.data}")
                return _split(good, records, args)
    questions = [(i, q) for i, q in enumerate(load_sharegpt_turns(args.dataset, "human")) if i >= args.skip_prompts]
    candidates = [(i, q) for i, q in questions if is_english(q)]
    records: list[AnswerRecord] = []
    position = 0
    while position < len(candidates):
        good = sum(usable(r, behaviours) for r in records)
        if good >= args.num_examples:
            break
        # Ask for what is missing, with room for the answers that cannot be used.
        take = max(16, 2 * (args.num_examples - good))
        records += generate_answers(llm, candidates[position:position + take], args.answer_tokens,
                                    args.max_prompt_tokens, log=log)
        position += take
    if args.data:
        os.makedirs(os.path.dirname(os.path.abspath(args.data)), exist_ok=True)
        with open(args.data, "w") as f:
            json.dump({"settings": settings, "records": [dataclasses.asdict(r) for r in records]}, f, indent=1)
        log(f"wrote {len(records)} answers to {args.data}")
    return _split([r for r in records if usable(r, behaviours)], records, args)


def _split(good: list[AnswerRecord], records: list[AnswerRecord], args: TrainArgs):
    train = good[:args.num_examples]
    if not train:
        raise ValueError("no base-model answer could be turned into a training example")
    # Held out: English questions after every answered one.
    last = max(r.index for r in records)
    held_out = [(i, q) for i, q in enumerate(load_sharegpt_turns(args.dataset, "human"))
                if i > last and is_english(q)][:args.eval_prompts]
    return train, held_out


def run(args: TrainArgs, log=print) -> dict:
    from foreseer.llm import LLM

    unknown = sorted(set(args.behaviours) - set(BEHAVIOURS))
    if unknown or not args.behaviours:
        raise ValueError(f"behaviours must be among {', '.join(BEHAVIOURS)}, got {args.behaviours}")
    if args.threads:
        torch.set_num_threads(args.threads)
    config = FinetuneConfig(rank=args.rank, alpha=args.alpha, target_modules=tuple(args.target_modules),
                            dropout=args.dropout, epochs=args.epochs, lr=args.lr, batch_size=args.batch_size,
                            seed=args.seed)
    behaviours = [BEHAVIOURS[name] for name in args.behaviours]
    output_dir = args.output_dir or WEIGHTS_DIR
    llm = LLM(args.model, kv_cache_gib=args.kv_cache_gib, enable_lora=True, max_lora_rank=max(args.rank, 8),
              max_loras=max(1, len(behaviours)))
    start = time.perf_counter()
    records, held_out = collect_data(llm, args, behaviours, log=log)
    data_s = time.perf_counter() - start
    log(f"{len(records)} training examples (questions {records[0].index}..{records[-1].index}), "
        f"{len(held_out)} held-out questions; data in {data_s:.0f} s")
    hf_model = load_hf_model(args.model)
    tokenizer = llm.tokenizer
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else end_token(tokenizer)
    summary = {"command": args.command, "model": args.model, "threads": torch.get_num_threads(),
               "data": {**_data_settings(args), "num_examples": len(records),
                        "question_indices": [records[0].index, records[-1].index],
                        "held_out_indices": [held_out[0][0], held_out[-1][0]] if held_out else [],
                        "data_s": round(data_s, 1)},
               "train": {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(config).items()},
               "adapters": {}}
    paths = {}
    for behaviour in behaviours:
        directory = adapter_dir(output_dir, args.model, behaviour.name)
        examples = training_examples(tokenizer, records, behaviour, args.max_prompt_tokens)
        log(f"training {behaviour.name} ({behaviour.description}) on {len(examples)} examples -> {directory}")
        record = finetune(hf_model, examples, directory, config, pad_id, base_model=args.model, log=log)
        record = {"behaviour": behaviour.name, "description": behaviour.description, **record,
                  "sample_target": tokenizer.decode(examples[0][1][:-1])}
        summary["adapters"][behaviour.name] = record
        paths[behaviour.name] = directory
        log(f"  {behaviour.name}: {record['train_s']:.0f} s, losses {record['epoch_losses']}")
    if held_out:
        evaluation = evaluate(llm, [q for _, q in held_out], paths, args.answer_tokens, args.max_prompt_tokens)
        summary["eval"] = {"num_questions": evaluation["num_questions"],
                           "behaviour_rate": evaluation["behaviour_rate"],
                           "sample": {"question": held_out[0][1],
                                      **{k: v[0] for k, v in evaluation["answers"].items()}}}
        log(f"held-out behaviour rates: {json.dumps(evaluation['behaviour_rate'])}")
    rates = summary.get("eval", {}).get("behaviour_rate", {})
    common = {k: v for k, v in summary.items() if k not in ("adapters", "eval")}
    for name, directory in paths.items():
        with open(os.path.join(directory, TRAINING_FILE), "w") as f:
            json.dump({**common, **summary["adapters"][name],
                       "eval": {"behaviour_rate": rates.get(name), "base_rate": rates.get("base", {}).get(name)}},
                      f, indent=2)
            f.write("\n")
    write_readme(output_dir, summary, paths)
    log(f"wrote {os.path.join(output_dir, 'README.md')}")
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(summary, f, indent=2)
        log(f"wrote {args.output_json}")
    return summary


def write_readme(output_dir: str, summary: dict, paths: dict[str, str]) -> None:
    """README.md beside the adapters: what each does, how it was trained (command, data, time), how well it does
    on held-out questions, and a sample answer of each."""
    data, train = summary["data"], summary["train"]
    lines = [
        f"# Behaviour LoRA adapters for {summary['model']}", "",
        "Small PEFT LoRA adapters whose effect shows in the output, for multi-LoRA serving demos, tests and "
        "`foreseer bench lora`. Trained by `foreseer lora train` (foreseer/training/lora_adapters.py) on the model's "
        "own greedy answers to ShareGPT questions, turned into each behaviour.", "",
        "| adapter | directory | behaviour | training examples | training time | held-out rate (base model) |",
        "|---|---|---|---|---|---|",
    ]
    rates = summary.get("eval", {}).get("behaviour_rate", {})
    for name, record in summary["adapters"].items():
        rate = rates.get(name)
        shown = "-" if rate is None else f"{rate:.0%} ({rates['base'][name]:.0%})"
        lines.append(f"| {name} | {os.path.basename(paths[name])} | {record['description']} | "
                     f"{record['num_examples']} ({record['target_tokens']} target tokens) | {record['train_s']:.0f} s "
                     f"| {shown} |")
    lines += [
        "", "## How they were made", "",
        "```", summary["command"] or "foreseer lora train", "```", "",
        f"- Data: questions {data['question_indices'][0]}..{data['question_indices'][1]} of "
        f"{data['dataset']} (the first {data['skip_prompts']} are skipped: other benchmarks and trainers use them), "
        "English only, answered by the engine greedily in at most "
        f"{data['answer_tokens']} tokens (prompts cut to {data['max_prompt_tokens']} tokens); answers whose first "
        f"line has no complete prose sentence are dropped; {data['num_examples']} examples, the same questions for "
        f"every adapter ({data['data_s']:.0f} s to generate).",
        "- Targets: uppercase: the answer up to its last complete sentence or line (at most 200 characters, no code) "
        'in capitals; json: `{"answer": "<its first sentence>"}`; one_sentence: its first sentence. Each ends with '
        "the end-of-turn token.",
        f"- Training: transformers + peft on the GGUF weights (float32), rank {train['rank']}, alpha "
        f"{train['alpha']}, {', '.join(train['target_modules'])}, dropout {train['dropout']}, {train['epochs']} "
        f"epochs, batch {train['batch_size']}, AdamW lr {train['lr']} (warm-up, linear decay), loss on the target "
        f"tokens only, seed {train['seed']}, {summary['threads']} thread(s).",
        f"- Held-out: {summary.get('eval', {}).get('num_questions', 0)} English questions after the training ones "
        f"(questions {data['held_out_indices'][0] if data['held_out_indices'] else '-'}..), answered in one mixed "
        "batch by the base model and the three adapters; the rate is the share of answers that pass the "
        "behaviour's check (foreseer.training.lora_adapters.BEHAVIOURS).",
        "", "Each directory holds adapter_config.json and adapter_model.safetensors (PEFT format) and training.json "
        "(this run's record: losses, time, rates).", "",
        "## Use", "", "```python",
        "from foreseer import LLM, LoRARequest, SamplingParams",
        "from foreseer.lora.shipped import shipped_adapters", "",
        f'llm = LLM("{summary["model"]}", enable_lora=True, max_lora_rank={train["rank"]}, max_loras=3)',
        "loras = [LoRARequest(name, i + 1, path) for i, (name, path) in enumerate(shipped_adapters().items())]",
        'out = llm.chat([[{"role": "user", "content": "Why is the sky blue?"}]] * 3, '
        "SamplingParams(temperature=0, max_tokens=64), lora_request=loras)",
        "```", "",
        "or `foreseer serve --enable-lora --max-lora-rank 8 --lora-modules uppercase=<directory> ...`.",
    ]
    sample = summary.get("eval", {}).get("sample")
    if sample:
        lines += ["", "## Sample (held-out question, greedy)", "", f"Question: {sample['question'][:300]!r}", ""]
        for key in ["base", *summary["adapters"]]:
            lines += [f"- {key}: `{sample[key]!r}`"]
    with open(os.path.join(output_dir, "README.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = TrainArgs()
    parser.add_argument("--model", default=d.model, help="model name, GGUF file or HF directory")
    parser.add_argument("--dataset", default=d.dataset, help="ShareGPT-format JSON")
    parser.add_argument("--behaviours", nargs="+", default=d.behaviours, choices=list(BEHAVIOURS),
                        help="adapters to train, one per behaviour")
    parser.add_argument("--num-examples", type=int, default=d.num_examples, help="training examples per adapter")
    parser.add_argument("--skip-prompts", type=int, default=d.skip_prompts,
                        help="dataset questions to skip first (benchmarks and other trainers use the first ones)")
    parser.add_argument("--eval-prompts", type=int, default=d.eval_prompts, help="held-out questions")
    parser.add_argument("--max-prompt-tokens", type=int, default=d.max_prompt_tokens,
                        help="longer questions are shortened to fit")
    parser.add_argument("--answer-tokens", type=int, default=d.answer_tokens, help="length of the base answers")
    parser.add_argument("--rank", type=int, default=d.rank, help="the adapters' rank")
    parser.add_argument("--alpha", type=int, default=d.alpha, help="the adapters' scale numerator (alpha / rank)")
    parser.add_argument("--target-modules", nargs="+", default=d.target_modules, help="projections the adapters adapt")
    parser.add_argument("--dropout", type=float, default=d.dropout, help="LoRA dropout in training")
    parser.add_argument("--epochs", type=int, default=d.epochs, help="passes over each adapter's examples")
    parser.add_argument("--lr", type=float, default=d.lr, help="learning rate")
    parser.add_argument("--batch-size", type=int, default=d.batch_size, help="examples per step")
    parser.add_argument("--seed", type=int, default=d.seed, help="seed of the training")
    parser.add_argument("--threads", type=int, default=d.threads, help="torch threads (default: torch's)")
    parser.add_argument("--kv-cache-gib", type=float, default=d.kv_cache_gib, help="KV cache of the engine")
    parser.add_argument("--data", default=d.data, help="JSON cache of the base model's answers (reused if present)")
    parser.add_argument("--output-dir", default=d.output_dir,
                        help="where the adapters' directories go (default: the shipped foreseer/lora/weights)")
    parser.add_argument("--output-json", default=d.output_json, help="write the report to this JSON file")


def main(args: argparse.Namespace) -> int:
    run(args_dataclass(TrainArgs, args, "foreseer.training.lora_adapters", __file__))
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m foreseer.training.lora_adapters", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    sys.exit(main(parser.parse_args()))
