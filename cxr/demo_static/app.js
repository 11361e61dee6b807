// The demo page: send an X-ray to our server (never to TorchServe directly), show the answer and the heatmap.
"use strict";

const $ = (id) => document.getElementById(id);

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = false;
  $("result").hidden = true;
  $("status").textContent = "";
}

function showResult(data) {
  const answer = data.answer;
  $("error").hidden = true;
  $("label").textContent = answer.label;
  const bars = $("bars");
  bars.replaceChildren();
  for (const [name, p] of Object.entries(answer.probabilities)) {
    const row = document.createElement("div");
    row.className = "row" + (name === answer.label ? " chosen" : "");
    const label = document.createElement("span");
    label.textContent = name;
    const track = document.createElement("div");
    track.className = "track";
    const fill = document.createElement("div");
    fill.className = "fill";
    fill.style.width = (100 * p).toFixed(1) + "%";
    track.append(fill);
    const value = document.createElement("span");
    value.textContent = (100 * p).toFixed(1) + "%";
    row.append(label, track, value);
    bars.append(row);
  }
  $("threshold").textContent = answer.threshold == null ? "highest probability wins" :
    `${answer.threshold.toFixed(3)} on p(${Object.keys(answer.probabilities).find((k) => k !== "NORMAL")})`;
  $("answered-by").textContent = `${answer.model} version ${answer.version}`;
  $("elapsed").textContent = `${data.elapsed_ms} ms`;
  $("gate").textContent = answer.gate && answer.gate.ran ?
    `passed (score ${answer.gate.score} <= ${answer.gate.limit})` : "off";
  const population = answer.population || {};
  $("population").textContent = population.inside === true ?
    `inside (score ${population.score} <= ${population.limit})` :
    population.inside === false ? `OUTSIDE (score ${population.score} > ${population.limit})` :
    `not checked (${population.check || "absent"})`;
  $("population-warning").hidden = population.inside !== false;
  $("population-warning").textContent = population.inside === false ?
    "Warning: this X-ray is unlike the ones the model was trained on; its answer is not reliable. " +
    `The model is for: ${population.intended_population}. See ${population.model_card}.` : "";
  if (data.original_png) {
    $("original").src = "data:image/png;base64," + data.original_png;
    $("base").src = $("original").src;
  }
  $("overlay").hidden = !data.overlay_png;
  if (data.overlay_png) $("overlay").src = "data:image/png;base64," + data.overlay_png;
  $("explain-note").hidden = !data.explain_error;
  $("explain-note").textContent = data.explain_error || "";
  $("result").hidden = false;
  $("status").textContent = "";
}

async function predict(body, query) {
  $("status").textContent = "Asking the model...";
  $("error").hidden = true;
  const params = new URLSearchParams({ model: $("model").value, ...query });
  let response;
  try {
    response = await fetch("/api/predict?" + params, { method: "POST", body });
  } catch (error) {
    showError("The demo server is not reachable: " + error.message);
    return;
  }
  let data;
  try {
    data = await response.json();
  } catch (error) {
    showError(`The server answered ${response.status} without a readable body.`);
    return;
  }
  if (!response.ok) {
    let message = `Could not classify this file (${response.status}): ${data.error || "unknown error"}`;
    if (data.intended_population) {
      message += `. The model is for: ${data.intended_population}. See ${data.model_card}.`;
    }
    showError(message);
    return;
  }
  showResult(data);
}

function sendFile(file) {
  if (!file) return;
  if (file.size > 16 * 1024 * 1024) {
    showError(`${file.name} is ${(file.size / 2 ** 20).toFixed(1)} MB: the limit is 16 MB.`);
    return;
  }
  predict(file, {});
}

async function init() {
  try {
    const config = await (await fetch("/api/config")).json();
    for (const name of config.models) $("model").append(new Option(name, name));
    for (const name of config.samples) $("sample").append(new Option(name, name));
  } catch (error) {
    showError("The demo server is not reachable: " + error.message);
  }
  $("file").addEventListener("change", (event) => sendFile(event.target.files[0]));
  $("sample").addEventListener("change", (event) => {
    if (event.target.value) predict(null, { sample: event.target.value });
  });
  const drop = $("drop");
  drop.addEventListener("dragover", (event) => { event.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    drop.classList.remove("over");
    sendFile(event.dataTransfer.files[0]);
  });
  $("opacity").addEventListener("input", (event) => {
    $("overlay").style.opacity = event.target.value / 100;
  });
}

init();
