"""The web page in real headless Chromium (Debian's chromium and chromium-driver, driven by selenium): the
completion view (send, stream, stop, grammar), the chat view (send, stream, stop, regenerate, edit a turn,
conversations kept in localStorage, Markdown) and the compare view (two adapter settings answering at once).
A screenshot of each view goes to tests/output/ (or $LLAMALORA_TEST_OUTPUT)."""

import json
import os
import shutil
import time

import pytest

from selenium import webdriver

from server_helpers import ADAPTER, client, running_server  # noqa: E402

OUTPUT = os.environ.get("LLAMALORA_TEST_OUTPUT") or os.path.join(os.path.dirname(__file__), "output")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    not (CHROMIUM and CHROMEDRIVER),
    reason="Debian's chromium and chromium-driver are not installed (apt-get install -y chromium chromium-driver)",
)


@pytest.fixture(scope="module")
def url(smollm2):
    from llamalora.loader import load_adapters

    adapters = load_adapters(smollm2.file, [(ADAPTER, 1.0)])
    with running_server(smollm2, adapters, n_ctx=1024, n_parallel=2, adapter_paths=[ADAPTER], scales=[0.5]) as base:
        yield base


@pytest.fixture(scope="module")
def browser():
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                 "--window-size=1200,900"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def set_field(driver, element_id, value):
    element = driver.find_element("id", element_id)
    element.clear()
    element.send_keys(str(value))


def open_page(browser, url):
    """Load the page and wait for the adapters it lists (from /lora-adapters); the waiter, for what follows."""
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(url + "/#completion")
    wait = WebDriverWait(browser, 30)
    wait.until(lambda d: d.find_elements("id", "lora-0"))
    return wait


def send(browser, **fields):
    """Fill the form's fields (by element id, in the order given) and press send."""
    for element_id, value in fields.items():
        set_field(browser, element_id, value)
    browser.find_element("id", "send").click()


def test_page_streams_the_answer(browser, url):
    wait = open_page(browser, url)
    assert browser.find_element("id", "lora-0").get_attribute("value") == "0.5"
    assert "lora-fortunes" in browser.find_element("id", "adapters").text
    send(browser, prompt="Once upon a time", n_predict=12, temperature=0)
    # The loading indicator shows while the answer streams in, and goes when it is done.
    wait.until(lambda d: "active" in d.find_element("id", "loading").get_attribute("class")
               or d.find_element("id", "stats").text)
    wait.until(lambda d: d.find_element("id", "stats").text)
    assert "active" not in browser.find_element("id", "loading").get_attribute("class")
    answer = browser.find_element("id", "answer").text
    assert "12 tokens" in browser.find_element("id", "stats").text
    assert browser.find_element("id", "error").text == ""
    with client(url) as http:
        expected = http.post("/completion", json={"prompt": "Once upon a time", "n_predict": 12, "temperature": 0,
                                                  "lora": [{"id": 0, "scale": 0.5}]}).json()["content"]
    # The page shows text (white space collapsed by the DOM's innerText at the edges).
    assert answer.strip() == expected.strip() and answer.strip()
    screenshot(browser, "completion-view.png")


def test_stop_button_ends_a_long_answer(browser, url):
    wait = open_page(browser, url)
    send(browser, prompt="List the numbers from one to one thousand:", n_predict=400)
    wait.until(lambda d: len(d.find_element("id", "answer").text) > 5)
    browser.find_element("id", "stop-button").click()
    wait.until(lambda d: "stopped after" in d.find_element("id", "stats").text)
    assert browser.find_element("id", "send").is_enabled()
    with client(url) as http:
        wait.until(lambda d: http.get("/health").json()["slots_idle"] == 2)


def test_grammar_box_constrains_the_answer(browser, url):
    import re

    wait = open_page(browser, url)
    send(browser, prompt="Pick three digits:", n_predict=8, temperature=1, grammar="root ::= [0-9] [0-9] [0-9]")
    wait.until(lambda d: d.find_element("id", "stats").text)
    assert browser.find_element("id", "error").text == ""
    assert re.fullmatch("[0-9]{3}", browser.find_element("id", "answer").text.strip())
    # A grammar that does not parse: the page shows the server's 400 message.
    send(browser, grammar="root ::= [0-9")
    wait.until(lambda d: d.find_element("id", "error").text)
    assert "grammar" in browser.find_element("id", "error").text


def test_completion_js_module_in_the_browser(browser, url):
    """The README's usage, run by the browser: import { llama } from '/completion.js', iterate the chunks."""
    browser.get(url + "/")
    browser.set_script_timeout(60)
    result = browser.execute_async_script("""
        const done = arguments[arguments.length - 1];
        import('/completion.js').then(async ({ llama, llamaPromise }) => {
          const chunks = [];
          for await (const chunk of llama('The capital of France is', { n_predict: 6, temperature: 0 })) {
            chunks.push(chunk.data);
          }
          const whole = await llamaPromise('The capital of France is', { n_predict: 6, temperature: 0 });
          done({ n: chunks.length, text: chunks.map((c) => c.content).join(''), last: chunks.at(-1).stop, whole });
        }).catch((e) => done({ error: String(e) }));
    """)
    assert "error" not in result, result
    with client(url) as http:
        expected = http.post("/completion", json={"prompt": "The capital of France is", "n_predict": 6,
                                                  "temperature": 0, "stop": ["</s>"]}).json()["content"]
    assert result["last"] is True and result["n"] >= 2
    assert result["text"] == expected == result["whole"] and expected


# the chat and compare views


def screenshot(browser, name: str) -> str:
    os.makedirs(OUTPUT, exist_ok=True)
    path = os.path.join(OUTPUT, name)
    assert browser.save_screenshot(path), path
    return path


def open_view(browser, url, view, clear=True):
    """The page at #view with a fresh localStorage (unless clear is false) and the adapters listed."""
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(url + "/#" + view)
    if clear:
        browser.execute_script("localStorage.clear()")
    browser.refresh()  # (a get of the same address with only the hash changed does not load the page again)
    wait = WebDriverWait(browser, 60)
    wait.until(lambda d: d.find_elements("css selector", "#chat-adapter option[value='0']"))
    return wait


def choose(browser, element_id, value):
    from selenium.webdriver.support.ui import Select

    Select(browser.find_element("id", element_id)).select_by_value(value)


def settings(browser, **values):
    for name, value in values.items():
        set_field(browser, "s-" + name, value)


def chat_api(url, messages, max_tokens, lora):
    with client(url) as http:
        r = http.post("/v1/chat/completions", json={"messages": messages, "max_tokens": max_tokens,
                                                    "temperature": 0, "lora": lora})
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["message"]["content"]


RECORD = """
    window.__seen = {};
    const note = (key, el) => {
      if (!el) return;
      (window.__seen[key] = window.__seen[key] || []).push([performance.now(), el.dataset.raw.length]);
    };
    new MutationObserver(() => {
      note('chat', document.querySelector('#chat-messages .message.assistant:last-of-type'));
      note('a', document.querySelector('#compare-a-messages .message.assistant:last-of-type'));
      note('b', document.querySelector('#compare-b-messages .message.assistant:last-of-type'));
    }).observe(document.body, {subtree: true, childList: true, attributes: true, attributeFilter: ['data-raw']});
"""


def assistant_texts(browser, box):
    """The replies' Markdown text, read in one script (the view re-renders its messages while it streams)."""
    return browser.execute_script(
        f"return [...document.querySelectorAll('#{box} .message.assistant')].map((e) => e.dataset.raw)")


def wait_done(wait, status_id):
    wait.until(lambda d: d.find_element("id", status_id).text not in ("", "generating…"))


def test_chat_view_send_stream_regenerate_edit(browser, url):
    wait = open_view(browser, url, "chat")
    settings(browser, temperature=0, max_tokens=24)
    choose(browser, "chat-adapter", "base")
    browser.execute_script(RECORD)
    question = "Write a haiku about the sea."
    set_field(browser, "chat-input", question)
    browser.find_element("id", "chat-send").click()
    wait_done(wait, "chat-status")
    assert browser.find_element("id", "chat-error").text == ""
    expected = chat_api(url, [{"role": "user", "content": question}], 24, [])
    assert assistant_texts(browser, "chat-messages") == [expected] and expected
    lengths = {n for _, n in browser.execute_script("return window.__seen.chat")}
    assert len(lengths) >= 3  # the reply grew chunk by chunk on screen
    assert "length" in browser.find_element("id", "chat-status").text
    screenshot(browser, "chat-view.png")

    # Kept in localStorage: after a reload the conversation is listed and shown again.
    browser.refresh()
    wait.until(lambda d: assistant_texts(d, "chat-messages") == [expected])
    assert browser.find_element("css selector", "#chat-list .current .title").text == question[:40]

    # Regenerate: the last reply again (greedy: the same), still one reply.
    choose(browser, "chat-adapter", "base")
    settings(browser, temperature=0, max_tokens=24)
    browser.find_element("id", "chat-regenerate").click()
    wait.until(lambda d: d.find_element("id", "chat-send").is_enabled()
               and d.find_element("id", "chat-status").text not in ("", "generating…"))
    assert assistant_texts(browser, "chat-messages") == [expected]

    # Edit the user turn: the reply after it is replaced by the answer to the edited text.
    browser.find_element("css selector", "#chat-messages .message.user .edit").click()
    area = browser.find_element("css selector", "#chat-messages .edit-text")
    area.clear()
    area.send_keys("Name three fruits.")
    browser.find_element("css selector", "#chat-messages .save").click()
    edited = chat_api(url, [{"role": "user", "content": "Name three fruits."}], 24, [])
    wait.until(lambda d: assistant_texts(d, "chat-messages") == [edited])
    users = browser.find_elements("css selector", "#chat-messages .message.user")
    assert [u.get_attribute("data-raw") for u in users] == ["Name three fruits."]


LONG = "Count from one to five hundred, one number per line."


def test_chat_view_stop(browser, url):
    wait = open_view(browser, url, "chat")
    settings(browser, max_tokens=400, temperature=0)
    choose(browser, "chat-adapter", "base")
    set_field(browser, "chat-input", LONG)  # greedy, its reply runs to max_tokens
    browser.find_element("id", "chat-send").click()
    wait.until(lambda d: len(assistant_texts(d, "chat-messages")[-1] or "") > 5)
    browser.find_element("id", "chat-stop").click()
    wait.until(lambda d: d.find_element("id", "chat-status").text == "stopped")
    assert browser.find_elements("css selector", "#chat-messages .message.assistant.stopped")
    assert browser.find_element("id", "chat-send").is_enabled()
    with client(url) as http:
        wait.until(lambda d: http.get("/health").json()["slots_idle"] == 2)


def test_markdown_in_the_chat_view(browser, url):
    """Stored replies render as Markdown: code blocks, inline code, lists; the model's HTML stays text."""
    reply = ("Here is **code**, with `x < 2`:\n\n```python\nprint('<b>hi</b>')\n```\n\n- one\n- two\n\n"
             "<img src=x onerror=alert(1)>")
    conversation = [{"id": "c1", "title": "md", "messages": [{"role": "user", "content": "<i>show</i>"},
                                                              {"role": "assistant", "content": reply}]}]
    open_view(browser, url, "chat")
    browser.execute_script("localStorage.setItem('llamalora.conversations', arguments[0]);"
                           "localStorage.setItem('llamalora.current', '\"c1\"');", json.dumps(conversation))
    open_view(browser, url, "chat", clear=False)
    body = browser.find_element("css selector", "#chat-messages .message.assistant .body")
    assert body.find_element("css selector", "pre code.language-python").get_attribute("textContent") == \
        "print('<b>hi</b>')\n"
    assert body.find_element("css selector", "strong").text == "code"
    assert body.find_element("css selector", "p code").text == "x < 2"
    assert [li.text for li in body.find_elements("css selector", "ul li")] == ["one", "two"]
    assert not body.find_elements("css selector", "img, b") and "<img src=x" in body.text
    user = browser.find_element("css selector", "#chat-messages .message.user .body")
    assert user.text == "<i>show</i>" and not user.find_elements("css selector", "i")
    browser.set_script_timeout(30)
    html = browser.execute_async_script("""
        const done = arguments[arguments.length - 1];
        import('/markdown.js').then(({ renderMarkdown }) => done([
          renderMarkdown('# T\\n1. a\\n2. b\\n> q\\n[l](https://example.org) [j](javascript:alert(1))'),
          renderMarkdown('```\\nunclosed <fence>'),
        ]));
    """)
    assert html[0] == ('<h1>T</h1>\n<ol><li>a</li><li>b</li></ol>\n<blockquote>q</blockquote>\n<p><a '
                       'href="https://example.org" target="_blank" rel="noopener noreferrer">l</a> '
                       '[j](javascript:alert(1))</p>')
    assert html[1] == "<pre><code>unclosed &lt;fence&gt;\n</code></pre>"


def test_compare_view_streams_two_adapter_settings_side_by_side(browser, url):
    wait = open_view(browser, url, "compare")
    settings(browser, temperature=0, max_tokens=40)
    choose(browser, "compare-a-adapter", "base")
    choose(browser, "compare-b-adapter", "0")
    set_field(browser, "compare-b-scale", 1)
    browser.execute_script(RECORD)
    question = "Tell me my fortune for today."
    set_field(browser, "compare-input", question)
    browser.find_element("id", "compare-send").click()
    wait_done(wait, "compare-status")
    assert browser.find_element("id", "compare-status").text == "done"
    assert browser.find_element("id", "compare-error").text == ""
    base = chat_api(url, [{"role": "user", "content": question}], 40, [])
    adapted = chat_api(url, [{"role": "user", "content": question}], 40, [{"id": 0, "scale": 1}])
    assert base != adapted  # the adapter changes the reply, so the columns can show it
    assert assistant_texts(browser, "compare-a-messages") == [base]
    assert assistant_texts(browser, "compare-b-messages") == [adapted]
    assert browser.find_element("id", "compare-a-label").text == "base model"
    assert browser.find_element("id", "compare-b-label").text.endswith("× 1")
    seen = browser.execute_script("return window.__seen")
    a = [t for t, n in seen["a"] if n > 0]
    b = [t for t, n in seen["b"] if n > 0]
    assert a[0] < b[-1] and b[0] < a[-1]  # both replies grew during the same span of time
    screenshot(browser, "compare-view.png")

    # A second turn goes to both, after each column's own first reply; stop ends both.
    settings(browser, max_tokens=400)
    set_field(browser, "compare-input", LONG)
    browser.find_element("id", "compare-send").click()
    wait.until(lambda d: all(len(t or "") > 3 for t in (assistant_texts(d, "compare-a-messages")[-1:]
                                                         + assistant_texts(d, "compare-b-messages")[-1:])))
    browser.find_element("id", "compare-stop").click()
    wait.until(lambda d: d.find_element("id", "compare-status").text == "stopped")
    assert len(browser.find_elements("css selector", "#compare-a-messages .message.user")) == 2
    with client(url) as http:
        wait.until(lambda d: http.get("/health").json()["slots_idle"] == 2)
