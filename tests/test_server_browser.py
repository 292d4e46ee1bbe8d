"""The web page in real headless Chromium (Debian's chromium and chromium-driver, driven by selenium): type a
prompt, send, watch the streamed answer appear, stop a long one."""

import shutil

import pytest

pytest.importorskip("httpx")
pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install selenium)")

from server_helpers import ADAPTER, client, running_server  # noqa: E402

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
    with running_server(smollm2, adapters, n_ctx=1024, n_parallel=1, adapter_paths=[ADAPTER], scales=[0.5]) as base:
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

    browser.get(url + "/")
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


def test_stop_button_ends_a_long_answer(browser, url):
    wait = open_page(browser, url)
    send(browser, prompt="List the numbers from one to one thousand:", n_predict=400)
    wait.until(lambda d: len(d.find_element("id", "answer").text) > 5)
    browser.find_element("id", "stop-button").click()
    wait.until(lambda d: "stopped after" in d.find_element("id", "stats").text)
    assert browser.find_element("id", "send").is_enabled()
    with client(url) as http:
        wait.until(lambda d: http.get("/health").json()["slots_idle"] == 1)


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
