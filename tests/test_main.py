"""`llamalora main` end to end on SmolLM2: prompt, file, instruct and chat turns, context shift, Ctrl-C."""

import os
import shlex
import signal
import subprocess
import sys
import time

import pytest
from conftest import data_path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main(*args, stdin=""):
    return subprocess.run([sys.executable, "-m", "llamalora.cli", "main", *args], input=stdin, capture_output=True,
                          text=True, timeout=300, cwd=ROOT)


def test_prompt_greedy_and_timings():
    r = main("-p", "The capital of France is", "-n", "4", "--temp", "0")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("The capital of France is Paris.")
    assert "prompt eval time" in r.stderr and "eval time" in r.stderr and "load time" in r.stderr
    assert "Traceback" not in r.stderr


def test_instruct_mode_from_the_alpaca_prompt_file():
    r = main("-f", "prompts/alpaca.txt", "-ins", "--temp", "0", "-n", "12", stdin="Name the capital of France.\n")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("Below is an instruction")
    assert r.stdout.count("\n> ") == 2  # asked once, answered, asked again, then end of input
    answer = r.stdout.split("\n> ", 1)[1].split("\n> ")[0]
    assert "Paris" in answer


def test_conversation_mode_uses_the_chat_template():
    r = main("-cnv", "--temp", "0", "-n", "16", stdin="What is the capital of France?\n")
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout
    assert "<|im_start|>" not in r.stdout  # control tokens are not printed


def test_context_shift_and_its_absence():
    r = main("-p", "Once upon a time", "-c", "24", "-n", "40", "--temp", "0", "--ignore-eos")
    assert r.returncode == 0, r.stderr
    assert "/    39 tokens" in r.stderr  # every generated token after the first was evaluated: the context shifted
    r = main("-p", "Once upon a time", "-c", "24", "-n", "40", "--temp", "0", "--ignore-eos", "--no-context-shift")
    assert r.returncode == 0, r.stderr
    assert "context is full (24 tokens)" in r.stderr


def test_ctrl_c_hands_the_turn_back_then_end_of_input_exits():
    p = subprocess.Popen([sys.executable, "-m", "llamalora.cli", "main", "-i", "-p", "Once upon a time", "--temp", "0",
                          "--ignore-eos", "-n", "-1", "-c", "4096"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, cwd=ROOT)
    assert p.stdout.read(len("Once upon a time")) == "Once upon a time"
    p.stdout.read(20)  # generation is running
    p.send_signal(signal.SIGINT)  # first Ctrl-C: the turn goes back to the user
    time.sleep(1.0)
    assert p.poll() is None
    out, err = p.communicate("", timeout=120)  # end of input: a clean exit
    assert p.returncode == 0, err
    assert "Traceback" not in err and "eval time" in err


def test_bad_options_are_one_line_errors(tmp_path):
    for args, message in ((["-p", "x", "-f", "y"], "either -p or -f"), (["-c", "-3"], "-c must be at least 0"),
                          (["-f", str(tmp_path / "missing.txt")], "missing.txt")):
        r = main(*args)
        assert r.returncode == 1
        assert message in r.stderr and "Traceback" not in r.stderr


def test_grammar_and_json_schema_constrain_the_output(tmp_path):
    import json

    r = main("-p", "Is the sky blue? Answer:", "-n", "8", "--temp", "0", "--grammar", 'root ::= " yes" | " no"')
    assert r.returncode == 0, r.stderr
    assert r.stdout.rstrip("\n")[len("Is the sky blue? Answer:"):] in (" yes", " no")
    schema = {"type": "object", "properties": {"age": {"type": "integer"}}, "required": ["age"],
              "additionalProperties": False}
    prompt = "A cat, as JSON: "
    r = main("-p", prompt, "-n", "40", "--temp", "0", "--json-schema", json.dumps(schema))
    assert r.returncode == 0, r.stderr
    value = json.loads(r.stdout[len(prompt):])
    assert set(value) == {"age"} and isinstance(value["age"], int)
    r = main("-p", "x", "--grammar", "root ::= undefined-rule")
    assert r.returncode == 1 and "undefined-rule" in r.stderr and "Traceback" not in r.stderr


# llama.cpp's LoRA pull request ran these two lines; users copy them (7B files there, SmolLM2's here)
SEED_LINES = (
    "main -m {f16} --lora {lora} --color -f ./prompts/alpaca.txt -ins -b 256 --top_k 10000 --temp 0.2 "
    "--repeat_penalty 1 -t 7",
    "main -m {q4_0} --lora {lora} --lora-base {f16} --color -f ./prompts/alpaca.txt -ins -b 256 --top_k 10000 "
    "--temp 0.2 --repeat_penalty 1 -t 7",
)


def run_interrupting_a_long_answer(args, stdin: str, max_answer: int = 1500) -> tuple[int, str, str]:
    """Run `main` with stdin; an answer that goes on past max_answer characters (sampling at a temperature may
    never reach an end of text) gets the Ctrl-C a user would give it, which hands the turn back."""
    p = subprocess.Popen([sys.executable, "-m", "llamalora.cli", "main", *args], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    p.stdin.write(stdin)
    p.stdin.close()
    out = ""
    while True:
        piece = p.stdout.read(1)
        if not piece:
            break
        out += piece
        if len(out.split("\n> ", 1)[-1]) > max_answer and out.count("\n> ") == 1:
            p.send_signal(signal.SIGINT)
            max_answer = 10**9
    err = p.stderr.read()
    return p.wait(timeout=60), out, err


@pytest.mark.parametrize("line", SEED_LINES, ids=["f16", "q4_0-lora-base"])
def test_the_seeds_command_lines_run_as_written(smollm2_f16_q4_0, line):
    f16, q4_0 = smollm2_f16_q4_0
    args = shlex.split(line.format(f16=f16, q4_0=q4_0, lora=data_path("ggla-lora-fortunes.bin")))
    code, out, err = run_interrupting_a_long_answer(args[1:], "Name the capital of France.\n")
    assert code == 0, err
    assert "Traceback" not in err and "No such option" not in err
    assert "Below is an instruction that describes a task." in out
    assert out.count("\n> ") == 2  # asked, answered, asked again, then end of input
    assert "60 tensors" in err and "merged 60 tensors" in err  # merged: into f16, or through --lora-base


def test_llama_cpps_underscore_spellings_are_hidden_aliases():
    r = main("-p", "The capital of France is", "--n_predict", "4", "--ctx_size", "64", "--batch_size", "8",
             "--top_k", "1", "--top_p", "0.5", "--repeat_last_n", "8", "--repeat_penalty", "1",
             "--presence_penalty", "0", "--frequency_penalty", "0", "--memory_f32", "-s", "1")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("The capital of France is Paris.")  # top_k 1: greedy
    help_text = main("--help").stdout
    assert "--top-k" in help_text and "--lora-base" in help_text
    assert "_" not in "".join(line.split()[0] for line in help_text.splitlines() if line.strip().startswith("-"))
