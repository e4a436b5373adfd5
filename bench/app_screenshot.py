"""The screenshot of the review page in README and docs/review.md (docs/img/review.png): `predict` over
the demo crops (examples/crops), `kmnist-batch review` on it, and a few tiles settled from the keyboard,
in Debian's headless chromium driven by Selenium (nothing downloaded).

    .venv/bin/python bench/app_screenshot.py   # rewrites docs/img/review.png
"""

from __future__ import annotations

import argparse
import io
import re
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from PIL import Image
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import WebDriverWait

ROOT = Path(__file__).resolve().parent.parent
CLI = str(Path(sys.executable).parent / "kmnist-batch")


def start_server(out: Path) -> tuple[subprocess.Popen, str]:
    server = subprocess.Popen([CLI, "review", str(out), "--port", "0", "--reviewer", "demo", "--audit", "30"],
                              stdout=subprocess.PIPE, text=True)
    for line in server.stdout:
        found = re.search(r"open (http://\S+)", line)
        if found:
            return server, found[1]
    raise RuntimeError("kmnist-batch review did not print its URL")


def screenshot(url: str, profile: Path) -> bytes:
    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1200,860",
                f"--user-data-dir={profile}", "--hide-scrollbars"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
    try:
        driver.get(url)
        wait = WebDriverWait(driver, 30)
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, 'nav button[data-tab="low_confidence"]'))
        driver.find_element(By.CSS_SELECTOR, 'nav button[data-tab="low_confidence"]').click()
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".tile img"))
        for key in ("1", Keys.ENTER, "x", Keys.ENTER, "l"):  # a few settled tiles, the cursor on the next
            ActionChains(driver).send_keys(key).perform()
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, '.tile[data-state="saved"]')) == 4)
        wait.until(lambda d: d.execute_script("return [...document.images].every(i => i.complete) && "
                                              "document.fonts.status === 'loaded'"))
        driver.execute_script("window.scrollTo(0, 0)")
        return driver.get_screenshot_as_png()
    finally:
        driver.quit()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "img" / "review.png")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "demo"
        subprocess.run([CLI, "predict", str(ROOT / "examples" / "crops"), "--out", str(run), "--quiet"], check=True,
                       stdout=subprocess.DEVNULL)
        server, url = start_server(run)
        try:
            png = screenshot(url, Path(tmp) / "profile")
        finally:
            server.send_signal(signal.SIGINT)
            server.wait(timeout=30)
    # A 64-colour palette keeps the PNG small enough for git; the page has few colours.
    Image.open(io.BytesIO(png)).convert("RGB").quantize(64).save(args.out, optimize=True)
    print(f"wrote {args.out} ({args.out.stat().st_size / 1024:.0f} KiB)")


if __name__ == "__main__":
    main()
