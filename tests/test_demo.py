"""The demo page in a real browser (headless Chromium through Selenium) against a real TorchServe:
upload -> result -> heatmap, a sample pick, a bad file, a server that is down, and a phone-width screen."""

import shutil
import threading
from pathlib import Path

import pytest

from cxr.client import Client, PredictionError
from cxr.demo import Demo, make_server
from cxr.server import free_ports
from tests.conftest import REPO

pytestmark = pytest.mark.integration
SCREENSHOTS = REPO / "logs" / "screenshots"


def find_browser() -> tuple[str, str] | None:
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    driver = shutil.which("chromedriver")
    return (browser, driver) if browser and driver else None


@pytest.fixture(scope="module")
def browser():
    found = find_browser()
    if found is None:
        pytest.skip("no Chromium + chromedriver here (make setup installs Debian's chromium and chromium-driver "
                    "when it can)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = found[0]
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                     "--window-size=1200,1100"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(found[1]), options=options)
    driver.set_page_load_timeout(60)
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    yield driver
    driver.quit()


def start_page(demo: Demo) -> tuple[str, object]:
    [port] = free_ports(1)
    server = make_server(port, demo)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{port}/", server


@pytest.fixture(scope="module")
def page(served, sample_paths):
    client = Client(served.keys, ports=served.ports, timeout=60, retries=1)
    url, server = start_page(Demo(client, ["pneumonia"], sample_paths[0].parent.parent))
    yield url
    server.shutdown()
    server.server_close()


def wait_for(driver, element_id: str, timeout: float = 90):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout).until(expected_conditions.visibility_of_element_located((By.ID, element_id)))


def upload(driver, path: Path) -> None:
    from selenium.webdriver.common.by import By

    field = driver.find_element(By.ID, "file")
    driver.execute_script("arguments[0].style.display = 'block';", field)  # hidden behind its styled label
    field.send_keys(str(path.resolve()))  # the browser needs an absolute path


def test_upload_shows_label_probabilities_and_heatmap(browser, page, sample_paths):
    from selenium.webdriver.common.by import By

    browser.get(page)
    assert "Chest X-ray" in browser.title or "chest X-ray" in browser.title
    upload(browser, sample_paths[-1])
    wait_for(browser, "result")
    assert browser.find_element(By.ID, "label").text in ("NORMAL", "PNEUMONIA")
    rows = browser.find_elements(By.CSS_SELECTOR, "#bars .row")
    assert [row.find_element(By.TAG_NAME, "span").text for row in rows] == ["NORMAL", "PNEUMONIA"]
    assert "pneumonia version 1.0" in browser.find_element(By.ID, "answered-by").text
    assert browser.find_element(By.ID, "elapsed").text.endswith("ms")
    assert browser.find_element(By.ID, "threshold").text.startswith("0.")
    overlay = browser.find_element(By.ID, "overlay")
    assert overlay.get_attribute("src").startswith("data:image/png;base64,") and overlay.is_displayed()
    assert browser.find_element(By.ID, "original").get_attribute("naturalWidth") != "0"
    slider = browser.find_element(By.ID, "opacity")
    browser.execute_script("arguments[0].value = 30; arguments[0].dispatchEvent(new Event('input'));", slider)
    assert overlay.value_of_css_property("opacity") == "0.3"
    browser.save_screenshot(str(SCREENSHOTS / "demo_result.png"))


def test_picking_a_sample_classifies_it(browser, page, sample_paths):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    browser.get(page)
    picker = Select(browser.find_element(By.ID, "sample"))
    offered = [p for p in sample_paths[0].parent.parent.rglob("*") if p.suffix.lower() in (".jpeg", ".jpg", ".png")]
    assert len(picker.options) == 1 + len(offered)  # "pick one..." + the 40 samples (20 example X-rays without data)
    picker.select_by_value("PNEUMONIA/person100_bacteria_475.jpeg")
    wait_for(browser, "result")
    assert browser.find_element(By.ID, "label").text == "PNEUMONIA"


def test_a_bad_file_shows_a_clear_error(browser, page, tmp_path):
    from selenium.webdriver.common.by import By

    bad = tmp_path / "letter.jpeg"
    bad.write_text("this is not an X-ray")
    browser.get(page)
    upload(browser, bad)
    error = wait_for(browser, "error")
    assert "400" in error.text and "not an image" in error.text
    assert not browser.find_element(By.ID, "result").is_displayed()
    browser.save_screenshot(str(SCREENSHOTS / "demo_bad_file.png"))


def test_a_photograph_is_refused_as_not_a_chest_xray(browser, page, tmp_path):
    from training.not_xrays import bundled_images

    photo = next(image for source, _, image in bundled_images() if source == "skimage/coffee")
    path = tmp_path / "coffee.jpeg"
    photo.convert("RGB").save(path)
    browser.get(page)
    upload(browser, path)
    assert "not a chest X-ray" in wait_for(browser, "error").text


def test_server_down_is_a_message_not_a_blank_page(browser, sample_paths):
    [dead_port] = free_ports(1)
    client = Client({"inference": "k", "management": "k"}, ports={"inference": dead_port}, timeout=5, retries=0)
    url, server = start_page(Demo(client, ["pneumonia"], sample_paths[0].parent.parent))
    try:
        browser.get(url)
        upload(browser, sample_paths[0])
        assert "did not answer" in wait_for(browser, "error").text
    finally:
        server.shutdown()
        server.server_close()


def test_phone_width_has_no_horizontal_scroll(browser, page, sample_paths):
    browser.set_window_size(390, 844)
    try:
        browser.get(page)
        upload(browser, sample_paths[0])
        wait_for(browser, "result")
        browser.save_screenshot(str(SCREENSHOTS / "demo_phone.png"))
        overflowing = browser.execute_script(
            "return [...document.querySelectorAll('body *')].filter(e => e.getBoundingClientRect().right > "
            "window.innerWidth + 1).map(e => e.tagName + '#' + e.id + '.' + e.className + ' ' + "
            "Math.round(e.getBoundingClientRect().right) + '>' + window.innerWidth)")
        assert overflowing == []
    finally:
        browser.set_window_size(1200, 1100)


def test_an_xray_outside_the_population_is_refused_plainly(browser, page):
    from tests.conftest import SHIPPED_MODEL
    from tests.handler_support import OTHER_SOURCES

    if not SHIPPED_MODEL.is_file():
        pytest.skip("the tiny test model has no population check")
    browser.get(page)
    upload(browser, sorted(OTHER_SOURCES.glob("*.jpg"))[0])
    error = wait_for(browser, "error").text
    assert "422" in error and "outside the model's population" in error and "children aged 1-5" in error
    assert "docs/model_cards/pneumonia.md" in error
    browser.save_screenshot(str(SCREENSHOTS / "demo_outside_population.png"))


class WarningClient:
    """Answers like a server set to `population_check: warn` for an X-ray outside the population."""

    def predict(self, data, model):
        return {"model": model, "version": "1.0", "label": "PNEUMONIA",
                "probabilities": {"NORMAL": 0.1, "PNEUMONIA": 0.9}, "threshold": 0.69,
                "gate": {"ran": True, "score": 0.1, "limit": 0.84},
                "population": {"inside": False, "score": 0.99, "limit": 0.83, "check": "logistic",
                               "intended_population": "children aged 1-5", "model_card": "docs/model_cards/x.md"}}

    def explain(self, data, model):
        raise PredictionError(501, "does not explain")


def test_a_warned_answer_carries_a_red_warning(browser, sample_paths):
    from selenium.webdriver.common.by import By

    url, server = start_page(Demo(WarningClient(), ["pneumonia"], sample_paths[0].parent.parent))
    try:
        browser.get(url)
        upload(browser, sample_paths[0])
        warning = wait_for(browser, "population-warning").text
        assert "unlike the ones the model was trained on" in warning and "children aged 1-5" in warning
        assert browser.find_element(By.ID, "population").text.startswith("OUTSIDE")
        assert browser.find_element(By.ID, "label").text == "PNEUMONIA"
    finally:
        server.shutdown()
        server.server_close()
