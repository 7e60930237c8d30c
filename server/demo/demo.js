// The demo page: choose audio, animate it whole (POST /api/infer) and play it
// in sync, or stream it live (WebSocket /api/stream) from the microphone or
// a file at real-time pace. Everything it shows lives in `state`, which the
// page exposes as window.demo.state (the browser test reads it).

import { channelIndex, createFace } from "./face.js";
import { drawCurves, drawHeatmap, MAIN_CHANNELS } from "./charts.js";

const $ = (id) => document.getElementById(id);
const FPS = 30;

const state = {
  mode: "idle", // idle | file | live
  names: [],
  index: {},
  frames: [], // weight arrays by frame index (holes while streaming)
  seconds: 0, // audio length (file) or audio sent so far (live)
  current: -1, // the frame drawn last
  drawn: null, // its geometry (faceGeometry)
  latencies: [], // live: ms from a frame's audio to its arrival
  result: null, // the last animation (what Download saves)
  error: null,
  model: null,
};

const draw = createFace($("face"));
let recorded = null; // a WAV Blob from "Record"
let live = null; // the running live stream

function setStatus(text, isError = false) {
  $("status").textContent = text;
  $("status").classList.toggle("error", isError);
  if (isError) state.error = text;
}

function headers() {
  const key = $("api-key").value.trim();
  return key ? { "X-API-Key": key } : {};
}

function options() {
  return {
    id_idx: parseInt($("id-idx").value || "0", 10),
    seed: $("seed").value === "" ? null : parseInt($("seed").value, 10),
    movement_smooth: $("movement-smooth").checked,
    brow_movement: $("brow-movement").checked,
    hop: parseFloat($("hop").value),
  };
}

function setNames(names) {
  state.names = names;
  state.index = channelIndex(names);
}

function render(k) {
  const frame = state.frames[k];
  if (!frame) return;
  state.current = k;
  state.drawn = draw(frame, state.index);
  $("frame-info").textContent = `frame ${k} (${(k / FPS).toFixed(2)} s)` +
    MAIN_CHANNELS.slice(0, 3).map(([n]) => `  ${n} ${frame[state.index[n]].toFixed(2)}`).join("");
}

function redrawCharts(playhead) {
  drawCurves($("curves"), state.frames, state.index, playhead, state.seconds);
  drawHeatmap($("heatmap"), state.frames, state.names, playhead, state.seconds);
}

// -- model info ------------------------------------------------------------------
async function loadHealth() {
  try {
    const h = await (await fetch("/api/health")).json();
    state.model = h.model;
    const m = h.model || {};
    $("model-info").textContent = `${h.status}: ${m.name ?? "?"} on ${m.device ?? "?"} (${m.dtype ?? ""}), ` +
      `${m.num_identities ?? "?"} identities, ${m.parameters ? (m.parameters / 1e6).toFixed(1) + " M parameters" : ""}`;
    if (m.num_identities) $("id-idx").max = m.num_identities - 1;
  } catch (e) {
    $("model-info").textContent = "health unavailable: " + e;
  }
}

// -- choosing audio ----------------------------------------------------------------
async function chosenAudio() {
  const file = $("file").files[0];
  if ($("source").value === "file" && file) return [file, file.name];
  if ($("source").value === "recording" && recorded) return [recorded, "recording.wav"];
  const name = $("sample").value;
  const response = await fetch(`/demo/samples/${name}`);
  if (!response.ok) throw new Error(`sample ${name}: ${response.status}`);
  return [await response.blob(), name];
}

function encodeWav(chunks, rate) {
  const n = chunks.reduce((a, c) => a + c.length, 0);
  const view = new DataView(new ArrayBuffer(44 + 2 * n));
  const text = (at, s) => [...s].forEach((ch, i) => view.setUint8(at + i, ch.charCodeAt(0)));
  text(0, "RIFF"); view.setUint32(4, 36 + 2 * n, true); text(8, "WAVE"); text(12, "fmt ");
  view.setUint32(16, 16, true); view.setUint16(20, 1, true); view.setUint16(22, 1, true);
  view.setUint32(24, rate, true); view.setUint32(28, rate * 2, true); view.setUint16(32, 2, true);
  view.setUint16(34, 16, true); text(36, "data"); view.setUint32(40, 2 * n, true);
  let at = 44;
  for (const c of chunks) for (const x of c) { view.setInt16(at, Math.max(-1, Math.min(1, x)) * 32767, true); at += 2; }
  return new Blob([view.buffer], { type: "audio/wav" });
}

let recorder = null;
async function toggleRecord() {
  if (recorder) {
    recorder.stop();
    return;
  }
  const stream = await navigator.mediaDevices.getUserMedia({ audio: true });
  const ctx = new AudioContext();
  const source = ctx.createMediaStreamSource(stream);
  const tap = ctx.createScriptProcessor(4096, 1, 1);
  const chunks = [];
  tap.onaudioprocess = (e) => chunks.push(new Float32Array(e.inputBuffer.getChannelData(0)));
  source.connect(tap); tap.connect(ctx.destination);
  $("record").textContent = "Stop recording";
  recorder = {
    stop() {
      tap.disconnect(); source.disconnect(); stream.getTracks().forEach((t) => t.stop());
      recorded = encodeWav(chunks, ctx.sampleRate);
      ctx.close();
      recorder = null;
      $("record").textContent = "Record";
      $("source").value = "recording";
      setStatus(`recorded ${(chunks.length * 4096 / ctx.sampleRate).toFixed(1)} s; "Animate" sends it`);
    },
  };
  setStatus("recording from the microphone...");
}

// -- whole file ------------------------------------------------------------------------
// The whole-file request last made, with the seed it used (drawn here when
// none was given), so that an export in another format is the same animation.
let lastRequest = null;

function inferForm(request, format) {
  const { blob, name, o } = request;
  const form = new FormData();
  form.append("audio_file", blob, name);
  form.append("id_idx", String(o.id_idx));
  form.append("movement_smooth", String(o.movement_smooth));
  form.append("brow_movement", String(o.brow_movement));
  form.append("seed", String(o.seed));
  form.append("format", format);
  return form;
}

async function animateFile() {
  await stopLive();
  const [blob, name] = await chosenAudio();
  const o = options();
  if (o.seed === null) o.seed = Math.floor(Math.random() * 2 ** 31);
  lastRequest = { blob, name, o };
  const form = inferForm(lastRequest, "json");
  setStatus(`animating ${name}...`);
  const t0 = performance.now();
  const response = await fetch("/api/infer", { method: "POST", body: form, headers: headers() });
  const body = await response.json();
  if (!response.ok) {
    setStatus(`${response.status}: ${body.detail ?? JSON.stringify(body)}`, true);
    return;
  }
  setNames(body.names);
  state.frames = body.frames.map((f) => f.weights);
  state.seconds = body.metadata.audio_length ?? state.frames.length / FPS;
  state.result = body;
  state.latencies = [];
  state.mode = "file";
  setStatus(`${state.frames.length} frames for ${state.seconds.toFixed(2)} s of audio in ` +
    `${((performance.now() - t0) / 1000).toFixed(2)} s (model ${body.metadata.inference_time?.toFixed(2) ?? "?"} s)`);
  const audio = $("audio");
  audio.src = URL.createObjectURL(blob);
  render(0);
  redrawCharts(0);
  try { await audio.play(); } catch (e) { setStatus($("status").textContent + " - press play to hear it"); }
}

function seek(t) {
  const k = Math.max(0, Math.min(state.frames.length - 1, Math.floor(t * FPS)));
  render(k);
  redrawCharts(k / FPS);
  const box = $("mouth-inner").getBBox();
  return { frame: k, mouthOpening: state.drawn.mouthOpening, mouthBoxHeight: box.height };
}

function tick() {
  if (state.mode === "file" && !$("audio").paused) {
    const k = Math.min(state.frames.length - 1, Math.floor($("audio").currentTime * FPS));
    if (k !== state.current) { render(k); redrawCharts(k / FPS); }
  }
  requestAnimationFrame(tick);
}

// -- live ---------------------------------------------------------------------------------
async function startLive(kind) {
  await stopLive();
  const o = options();
  const ctx = new AudioContext();
  let source, stopSource;
  if (kind === "mic") {
    const stream = await navigator.mediaDevices.getUserMedia({ audio: { echoCancellation: true } });
    source = ctx.createMediaStreamSource(stream);
    stopSource = () => stream.getTracks().forEach((t) => t.stop());
  } else {
    const [blob] = await chosenAudio();
    const buffer = await ctx.decodeAudioData(await blob.arrayBuffer());
    source = ctx.createBufferSource();
    source.buffer = buffer;
    source.connect(ctx.destination); // hear it while it streams
    source.onended = () => stopLive();
    source.start();
    stopSource = () => { try { source.stop(); } catch (e) { /* already ended */ } };
  }
  const scheme = location.protocol === "https:" ? "wss" : "ws";
  // Browsers cannot set headers on a WebSocket: the key goes as a subprotocol, answered "a2e".
  const key = $("api-key").value.trim();
  const ws = new WebSocket(`${scheme}://${location.host}/api/stream`, key ? ["a2e", `a2e-key.${key}`] : []);
  ws.binaryType = "arraybuffer";
  const tap = ctx.createScriptProcessor(2048, 1, 1);
  const blockMs = 2048 / ctx.sampleRate * 1000;
  const session = { ctx, ws, tap, source, stopSource, sent: 0, t0: null, started: false, ended: null, kind };
  live = session; // the callbacks below keep using `session` after stopLive() lets go of `live`
  state.mode = "live";
  state.frames = [];
  state.latencies = [];
  state.seconds = 0;
  state.current = -1;
  state.result = null;
  $("audio").removeAttribute("src");

  ws.onopen = () => ws.send(JSON.stringify({
    type: "start", sample_rate: ctx.sampleRate, encoding: "s16le", id_idx: o.id_idx, hop: o.hop,
    ...(o.seed !== null ? { seed: o.seed } : {}),
  }));
  let endedResolve;
  session.ended = new Promise((resolve) => { endedResolve = resolve; });
  ws.onmessage = (e) => {
    const m = JSON.parse(e.data);
    if (m.type === "started") {
      setNames(m.names);
      session.started = true;
      setStatus(`streaming (${kind === "mic" ? "microphone" : "file at real-time pace"}), hop ${m.hop} s...`);
    } else if (m.type === "frames") {
      const now = performance.now();
      for (const f of m.frames) {
        const k = Math.round(f.time * FPS);
        state.frames[k] = f.weights;
        // The frame's audio ended (k+1)/30 s into the stream; the first block
        // was sent when it was complete, blockMs after its first sample.
        state.latencies.push(now - (session.t0 - blockMs + ((k + 1) / FPS) * 1000));
      }
      render(m.first_frame + m.frames.length - 1);
      const sorted = [...state.latencies].sort((a, b) => a - b);
      $("latency").textContent = `latency: last ${state.latencies.at(-1).toFixed(0)} ms, ` +
        `median ${sorted[Math.floor(sorted.length / 2)].toFixed(0)} ms over ${sorted.length} frames`;
      redrawCharts(state.current / FPS);
    } else if (m.type === "end") {
      setStatus(`stream ended: ${m.frames} frames for ${m.audio_seconds.toFixed(2)} s of audio`);
      endedResolve();
    } else if (m.type === "error") {
      setStatus(`stream error ${m.status}: ${m.detail}`, true);
      endedResolve();
    }
  };
  ws.onclose = () => endedResolve();
  ws.onerror = () => setStatus("the WebSocket failed (with --api-key: is the key on this page right?)", true);

  tap.onaudioprocess = (e) => {
    if (!session.started || ws.readyState !== WebSocket.OPEN) return;
    const x = e.inputBuffer.getChannelData(0);
    const pcm = new Int16Array(x.length);
    for (let i = 0; i < x.length; i++) pcm[i] = Math.max(-1, Math.min(1, x[i])) * 32767;
    if (session.t0 === null) session.t0 = performance.now();
    ws.send(pcm.buffer);
    session.sent += x.length;
    state.seconds = session.sent / ctx.sampleRate;
  };
  source.connect(tap);
  tap.connect(ctx.destination); // a ScriptProcessor runs only when connected (it outputs silence)
}

async function stopLive() {
  if (!live) return;
  const l = live;
  live = null;
  l.stopSource();
  l.tap.disconnect();
  if (l.ws.readyState === WebSocket.OPEN) {
    l.ws.send(JSON.stringify({ type: "end" }));
    await Promise.race([l.ended, new Promise((r) => setTimeout(r, 5000))]);
    l.ws.close();
  }
  l.ctx.close();
  state.mode = "idle";
  state.result = {
    type: "stream", names: state.names, fps: FPS,
    frames: state.frames.map((w, k) => ({ weights: w, time: k / FPS })).filter((f) => f.weights),
  };
}

// -- download -------------------------------------------------------------------------------
const EXTENSIONS = { json: "json", json_named: "json", csv: "csv", gltf: "glb", ndjson: "ndjson" };

// The last result in an export format of the server's (/api/infer `format`);
// a live stream's frames are available as JSON only.
async function exportBlob(format) {
  if (!state.result) throw new Error("nothing to download yet");
  if (format === "json" || state.mode === "live" || !lastRequest || state.result.type === "stream") {
    return new Blob([JSON.stringify(state.result)], { type: "application/json" });
  }
  const response = await fetch("/api/infer", { method: "POST", body: inferForm(lastRequest, format), headers: headers() });
  if (!response.ok) throw new Error(`export ${format}: ${response.status} ${(await response.json()).detail}`);
  return await response.blob();
}

async function download() {
  const format = $("export-format").value;
  const blob = await exportBlob(format);
  const a = document.createElement("a");
  a.href = URL.createObjectURL(blob);
  a.download = `animation.${EXTENSIONS[format]}`;
  a.click();
}

function guard(fn) {
  return async (...args) => {
    try { return await fn(...args); } catch (e) { setStatus(String(e), true); throw e; }
  };
}

$("animate").onclick = guard(animateFile);
$("live-mic").onclick = guard(() => startLive("mic"));
$("live-file").onclick = guard(() => startLive("file"));
$("stop").onclick = guard(async () => { await stopLive(); $("audio").pause(); });
$("record").onclick = guard(toggleRecord);
$("download").onclick = guard(download);
$("file").onchange = () => { $("source").value = "file"; };
$("audio").onseeked = () => { if (state.mode === "file") seek($("audio").currentTime); };
window.addEventListener("resize", () => redrawCharts(state.current >= 0 ? state.current / FPS : null));

window.demo = {
  state, seek, exportBlob, animateFile: guard(animateFile), startLive: guard(startLive), stopLive: guard(stopLive),
};
state.drawn = draw([], {}); // a neutral face until there are frames
loadHealth();
requestAnimationFrame(tick);
