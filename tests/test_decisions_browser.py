"""The review page in a real browser: Debian's headless chromium, driven by Selenium through Debian's
chromedriver (both named by path, so nothing is downloaded), against a real `kmnist-batch review`
process over a real predict run: reviewing from the keyboard and the mouse, and what a page on another
origin cannot do to it (frame it, post a decision). Skipped, saying what is missing, where either is not
installed."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from kmnist_core.storage import resolve
from reviews import store
from tests.decisions_server import Server, make_run

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.exists()]
try:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait
except ImportError:
    missing.append("the selenium package")

pytestmark = [pytest.mark.timeout(300),
              pytest.mark.skipif(bool(missing), reason=f"browser tests need {', '.join(missing)} "
                                                       "(Debian: apt-get install chromium chromium-driver)")]
TILES = "return [...document.querySelectorAll('.tile')].map(t => [t.dataset.id, t.dataset.state, t.dataset.label, " \
        "t.querySelector('.state').textContent])"


@pytest.fixture(scope="module")
def run(tmp_path_factory, kmnist_dev) -> Path:
    return make_run(tmp_path_factory.mktemp("review-browser"), kmnist_dev.test.images)


@pytest.fixture
def out(run, tmp_path) -> Path:
    shutil.copytree(run, tmp_path / "out", symlinks=True)  # an OUT links its report in
    return tmp_path / "out"


@pytest.fixture
def servers():
    started: list[Server] = []
    yield lambda out, *args: started.append(Server(out, *args)) or started[-1]
    for server in started:
        server.kill()


@pytest.fixture
def browser(tmp_path):
    """Opens a headless chromium (its own profile in tmp_path) on a URL."""
    started = []

    def open_(url: str):
        n = len(started)
        options = webdriver.ChromeOptions()
        options.binary_location = str(CHROMIUM)
        for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--no-first-run",
                    "--window-size=1280,1000", f"--user-data-dir={tmp_path / f'profile-{n}'}",
                    "--disable-background-networking", "--disable-component-update"):
            options.add_argument(arg)
        options.set_capability("goog:loggingPrefs", {"browser": "ALL"})  # the console: policy violations
        driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER), log_output=str(tmp_path / f"driver-{n}.log")),
                                  options=options)
        started.append(driver)
        driver.get(url)
        return driver

    yield open_
    for driver in started:
        driver.quit()


def tiles(driver) -> list[list[str]]:
    """[row id, state, label, state text] of each tile on the page."""
    return driver.execute_script(TILES)


def until(driver, condition, timeout: float = 20):
    return WebDriverWait(driver, timeout, poll_frequency=0.05).until(lambda d: condition())


def on_element(driver, css: str, act):
    """`act(element)` on the element `css` names once it exists. The page redraws its tabs each time it
    polls (every 2 s), so an element found just before a redraw is looked up again."""
    done = []

    def attempt() -> bool:
        try:
            done.append(act(driver.find_element(By.CSS_SELECTOR, css)))
            return True
        except (StaleElementReferenceException, NoSuchElementException):
            return False

    until(driver, attempt)
    return done[0]


def open_tab(driver, tab: str, expected_ids: list[str]) -> None:
    on_element(driver, f'nav button[data-tab="{tab}"]', lambda el: el.click())
    until(driver, lambda: [t[0] for t in tiles(driver)] == expected_ids)


def press(driver, *keys: str) -> None:
    for key in keys:
        ActionChains(driver).send_keys(key).perform()


def standing(out: Path) -> dict[str, tuple[str, str]]:
    """path -> (label, reviewer) of every key's standing decision, read from OUT/reviews/."""
    return {r["path"]: (r["label"], r["reviewer"]) for r in store.latest(store.read_history(resolve(out))).to_pylist()}


def test_label_with_keys_accept_the_page_undo_one_and_reload(out, servers, browser):
    server = servers(out, "--reviewer", "kana")
    page = server.get_json("/api/queue?tab=low_confidence")["tiles"]
    ids = [t["id"] for t in page]
    assert len(ids) >= 6
    driver = browser(server.url)
    open_tab(driver, "low_confidence", ids)

    press(driver, "1", Keys.ENTER, "l", "h", "x", "?")  # お; the model's top-1; move right and back; x; ?
    expected = {0: "お", 1: page[1]["pred_char"], 2: "not_a_character", 3: "unreadable"}
    until(driver, lambda: all(tiles(driver)[i][1:3] == ["saved", label] for i, label in expected.items()))
    assert standing(out) == {page[i]["path"]: (label, "kana") for i, label in expected.items()}

    press(driver, "a")  # every tile not yet touched: its top-1
    until(driver, lambda: all(t[1] == "saved" for t in tiles(driver)))
    assert [t[2] for t in tiles(driver)][4:] == [t["pred_char"] for t in page[4:]]
    press(driver, "u")  # undo the last decision: the page's last tile is open again
    until(driver, lambda: tiles(driver)[-1][1:3] == ["open", ""])
    expected.update({i: t["pred_char"] for i, t in enumerate(page) if 4 <= i < len(page) - 1})
    assert standing(out) == {page[i]["path"]: (label, "kana") for i, label in expected.items()}

    driver.refresh()  # the page comes back on the same tab and page, every decision as on disk
    until(driver, lambda: [t[0] for t in tiles(driver)] == ids)
    shown = tiles(driver)
    assert [t[1:3] for t in shown[:-1]] == [["saved", expected[i]] for i in range(len(page) - 1)]
    assert shown[-1][1:3] == ["open", ""]
    assert all(t[3] == "saved" for t in shown[:-1])
    counts = on_element(driver, 'nav button[data-tab="low_confidence"]', lambda el: el.text)
    assert f"1 left of {len(page)}" in counts


def test_kill_9_right_after_the_page_says_saved(out, servers, browser):
    server = servers(out)
    page = server.get_json("/api/queue?tab=unknown_character")["tiles"]
    driver = browser(server.url)
    open_tab(driver, "unknown_character", [t["id"] for t in page])
    press(driver, "a")
    until(driver, lambda: all(t[1] == "saved" for t in tiles(driver)))
    server.kill()  # SIGKILL the moment the page says saved
    assert {path: label for path, (label, _) in standing(out).items()} == {t["path"]: t["pred_char"] for t in page}


def test_two_browsers_on_two_servers_at_once(out, servers, browser):
    alice, bob = servers(out, "--reviewer", "alice"), servers(out, "--reviewer", "bob")
    page = alice.get_json("/api/queue?tab=low_confidence")["tiles"]
    ids = [t["id"] for t in page]
    a, b = browser(alice.url), browser(bob.url)
    open_tab(a, "low_confidence", ids)
    open_tab(b, "low_confidence", ids)

    b.find_element(By.CSS_SELECTOR, ".tile:nth-child(3)").click()  # bob uses the mouse ...
    press(a, "2")  # ... while alice uses the keys
    b.find_element(By.CSS_SELECTOR, '#palette button[data-label="す"]').click()
    press(a, "2")
    b.find_element(By.CSS_SELECTOR, '#palette button[data-action="not_a_character"]').click()
    until(a, lambda: [t[1:3] for t in tiles(a)[:2]] == [["saved", "き"]] * 2)
    until(b, lambda: [t[1:3] for t in tiles(b)[2:4]] == [["saved", "す"], ["saved", "not_a_character"]])
    assert standing(out) == {page[0]["path"]: ("き", "alice"), page[1]["path"]: ("き", "alice"),
                             page[2]["path"]: ("す", "bob"), page[3]["path"]: ("not_a_character", "bob")}
    # each page shows the other's decisions by itself (it polls; the server lists reviews/ again)
    until(a, lambda: [t[1:] for t in tiles(a)[2:4]] == [["saved", "す", "saved · by bob"],
                                                         ["saved", "not_a_character", "saved · by bob"]])
    until(b, lambda: [t[1:] for t in tiles(b)[:2]] == [["saved", "き", "saved · by alice"]] * 2)


# A page on another port of the same host: the same site, so the browser sends the review cookie with its
# requests (SameSite=Strict does not tell ports apart); only the server's own checks stop it.
ATTACK = """<!doctype html>
<title>attacker</title>
<iframe id="framed" src="{app}" width="900" height="500"></iframe>
<form id="form" method="POST" action="{target}" enctype="text/plain">
<input type="hidden" name='{name}' value='"}}'>
</form>
<script>
window.posted = fetch("{target}", {{method: "POST", credentials: "include",
                                  headers: {{"Content-Type": "application/json"}}, body: '{decision}'}})
  .then(r => "answered " + r.status, e => "refused: " + e);
</script>
"""
HEADERS = ("return Promise.all(arguments[0].map(p => fetch(p).then(r => [p, r.status, Object.fromEntries(r.headers)])))"
           ".then(arguments[arguments.length - 1])")


def test_a_page_on_another_origin_cannot_frame_the_app_or_post_a_decision(out, servers, browser, http_root):
    server = servers(out)
    tile = server.get_json("/api/queue?tab=low_confidence")["tiles"][0]
    driver = browser(server.url)
    until(driver, lambda: tiles(driver))  # the app runs: the browser holds the review cookie
    root, attacker = http_root
    decision = json.dumps({"decisions": [{"id": tile["id"], "label": tile["pred_char"]}]})
    # a text/plain form whose body is that JSON: `name=value` with name `{...,"pad":"` and value `"}`
    (root / "attack.html").write_text(ATTACK.format(app=f"{server.base}/", target=f"{server.base}/api/decisions",
                                                    decision=decision, name=decision[:-1] + ', "pad": "'),
                                      encoding="utf-8")
    driver.get(f"{attacker}attack.html")

    # (a) framing: the frame holds the browser's error page, never the app
    driver.switch_to.frame(driver.find_element(By.ID, "framed"))
    until(driver, lambda: driver.execute_script("return location.href") != "about:blank")
    assert not driver.execute_script("return location.href").startswith(server.base)
    assert not driver.find_elements(By.CSS_SELECTOR, "nav button, .tile")
    driver.switch_to.default_content()
    assert any("frame-ancestors" in entry["message"] for entry in driver.get_log("browser"))

    # (b) a script's POST with the cookie: the preflight a JSON body needs is never granted
    assert driver.execute_script("return window.posted").startswith("refused")  # (the promise, awaited)
    # (c) a form POST (no preflight, the cookie sent): refused for its Origin, whatever its body
    driver.execute_script("document.getElementById('form').submit()")
    until(driver, lambda: driver.current_url == f"{server.base}/api/decisions")
    assert driver.find_element(By.TAG_NAME, "body").text.startswith("403: a page from another origin")
    assert not (out / "reviews").exists()
    assert server.get_json("/api/queue?tab=low_confidence")["tiles"][0]["decision"] is None


def test_the_app_runs_under_its_policy_and_its_token_only_opens_slash(out, servers, browser):
    server = servers(out)
    driver = browser(server.url)
    until(driver, lambda: tiles(driver))
    until(driver, lambda: driver.execute_script(  # crops and the kana font load under default-src 'self'
        "return [...document.images].filter(i => i.closest('.tile')).every(i => i.complete && i.naturalWidth > 0)"
        " && document.fonts.check('16px IPAexGothic', 'お')"))
    assert not [e for e in driver.get_log("browser") if "Content Security Policy" in e["message"]]
    answers = driver.execute_async_script(HEADERS, ["/", "/static/app.js", "/static/app.css", "/api/info",
                                                    "/api/queue?tab=blank", "/no/such/page"])
    assert [status for _, status, _ in answers] == [200] * 5 + [404]
    for path, _, headers in answers:
        assert "frame-ancestors 'none'" in headers["content-security-policy"], path
        assert (headers["x-frame-options"], headers["x-content-type-options"], headers["referrer-policy"],
                headers["cache-control"]) == ("DENY", "nosniff", "no-referrer", "no-store"), path
    # the printed token opens / only: on any other path it is refused, although the browser holds the cookie
    driver.get(f"{server.base}/api/info?token={server.token}")
    assert driver.find_element(By.TAG_NAME, "body").text.startswith("403: the token is taken only")
    driver.get(f"{server.base}/api/info")
    assert json.loads(driver.find_element(By.TAG_NAME, "body").text)["out"] == str(out)
