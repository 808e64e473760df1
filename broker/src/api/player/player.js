// Framecast dev player page: allocates a session from the broker (/v1/sessions), plays it over
// WHEP from the node's agent, sends keyboard and mouse input on the `input` data channel and
// reads the synthetic game's picture markers to time input → frame. The contract it follows is
// docs/PROTOCOL.md, "Player ↔ agent"; the page, its query parameters and its test-mode report
// are described in docs/API.md, "Player page". Plain script, no build step, no external
// resources.
'use strict';

(() => {
  const $ = (id) => document.getElementById(id);
  const query = new URLSearchParams(location.search);
  const TEST = query.get('autoplay') === '1';

  // The input channel's event kinds (docs/PROTOCOL.md, "The input channel").
  const KIND = {
    KEY_DOWN: 0x01,
    KEY_UP: 0x02,
    MOUSE_MOVE: 0x03,
    MOUSE_DOWN: 0x04,
    MOUSE_UP: 0x05,
    WHEEL: 0x06,
    PAD_BUTTON: 0x07,
    PAD_AXIS: 0x08,
    PING: 0x09,
    PONG: 0x0a,
  };
  const HEADER = 9; // kind u8, seq u32 LE, t_ms u32 LE
  const HID_RIGHT_ARROW = 0x4f;
  const HID = hidUsages();
  const MARK_NAMES = ['allocated', 'offer_sent', 'answer', 'ice_connected', 'connected', 'first_frame'];
  const MARKER_MASK = 0xffffff; // markers carry their numbers modulo 2^24
  const PLACED = new Set(['reserved', 'connecting', 'active', 'reconnecting']);

  const video = $('video');
  const markerCanvas = document.createElement('canvas');
  const markerCtx = markerCanvas.getContext('2d', { willReadFrequently: true });

  let config = { api_key: null, region: null, games: [], tiers: [], genres: [] };
  let run = null; // the current (or last) play
  const pageLog = []; // lines logged outside a play

  // ---------------------------------------------------------------------------------------
  // Start

  wireControls();
  wireInput();
  // An idle run, so the panels show their rows before the first play.
  run = newRun({});
  run.stopped = true;
  run.stopping = Promise.resolve();
  renderAll(run);
  const configLoaded = loadConfig();
  if (TEST) {
    configLoaded.finally(testMode);
  }

  async function loadConfig() {
    try {
      const resp = await fetch('/player/config.json', { cache: 'no-store' });
      if (!resp.ok) throw new Error(`GET /player/config.json: ${await problemText(resp)}`);
      config = await resp.json();
      fillControls();
      setStatus(TEST ? 'test mode' : 'ready');
    } catch (e) {
      setStatus('no configuration');
      setError(e.message);
      logLine(null, `config: ${e.message}`);
    }
  }

  // ---------------------------------------------------------------------------------------
  // Play and stop

  /// Starts a play: allocate, then WHEP. Resolves once the WHEP answer is applied; the play
  /// goes on (stats, frames, input) until `stop`.
  async function play(opts) {
    if (run && !run.stopped) await stop(run);
    const r = newRun(opts);
    run = r;
    setError('');
    renderAll(r);
    setPlaying(true);
    startFrameLoop(r);
    try {
      const view = await allocate(r);
      alive(r);
      await connect(r, view);
      alive(r);
      if (!r.sse) watch(r); // a 201: follow the session's state from now on, for the display
      r.timers.push(setInterval(() => pollStats(r), 1000));
      r.timers.push(setInterval(() => renderInput(r), 250));
      return r;
    } catch (e) {
      if (!r.stopped) {
        setError(e.message);
        setStatus('failed');
        logLine(r, `failed: ${e.message}`);
      }
      await stop(r);
      throw e;
    }
  }

  function newRun(opts) {
    const r = {
      t0: performance.now(),
      key: opts.key,
      game: opts.game,
      tier: opts.tier,
      genre: opts.genre,
      marks: {},
      log: [],
      sessionId: null,
      nodeId: null,
      servedTier: null,
      view: null, // the newest SessionView seen
      whepUrl: null,
      token: null,
      location: null, // the WHEP stream's URL, absolute
      ufrag: null,
      pwd: null,
      mids: new Map(), // mid → media kind, from the offer
      pc: null,
      dc: null,
      candidates: [], // local candidates not yet sent
      gatheringDone: false,
      endSent: false,
      patches: Promise.resolve(),
      sse: null,
      timers: [],
      stopped: false,
      stopping: null,
      whepDeleteStatus: null,
      sessionDeleted: false,
      seq: 0, // every event, pings included
      gameSent: 0, // events for the game (not pings)
      lastGameSeq: 0,
      pending: [], // {seq, t}: game events not yet seen in the marker
      latencies: [],
      pings: new Map(), // seq → send time
      inputRtts: [],
      markersRead: 0,
      marker: null, // {frame, seq}
      markerBefore: null,
      firstFrame: null,
      stats: null,
    };
    r.firstFramePromise = new Promise((resolve) => {
      r.onFirstFrame = resolve;
    });
    r.fatal = new Promise((_, reject) => {
      r.failWith = reject;
    });
    r.fatal.catch(() => {}); // observed by test mode's races only
    return r;
  }

  /// Stops a play: DELETE on the WHEP stream (the agent ends the session), or the broker's
  /// DELETE when there is no stream yet; closes the peer connection. Idempotent.
  function stop(r) {
    if (r.stopping) return r.stopping;
    r.stopped = true;
    r.stopping = (async () => {
      for (const t of r.timers) clearInterval(t);
      r.timers = [];
      releaseHeldKeys(r);
      if (document.pointerLockElement === video) document.exitPointerLock();
      let whepOk = false;
      if (r.location) {
        try {
          const resp = await fetch(r.location, {
            method: 'DELETE',
            headers: { Authorization: `Bearer ${r.token}` },
            signal: timeoutSignal(3000),
          });
          r.whepDeleteStatus = resp.status;
          whepOk = resp.ok;
          logLine(r, `WHEP DELETE → ${resp.status}${resp.ok ? '' : ` ${await problemText(resp)}`}`);
        } catch (e) {
          logLine(r, `WHEP DELETE failed: ${e.message}`);
        }
      }
      if (!whepOk && r.sessionId && !(r.view && r.view.state === 'ended')) {
        // No stream to end (still queued, or the WHEP request failed): end it at the broker.
        try {
          const resp = await fetch(`/v1/sessions/${encodeURIComponent(r.sessionId)}`, {
            method: 'DELETE',
            headers: auth(r),
            signal: timeoutSignal(3000),
          });
          r.sessionDeleted = resp.ok;
          logLine(r, `DELETE /v1/sessions/${r.sessionId} → ${resp.status}`);
        } catch (e) {
          logLine(r, `DELETE /v1/sessions/${r.sessionId} failed: ${e.message}`);
        }
      }
      if (r.dc) r.dc.close();
      if (r.pc) r.pc.close();
      if (run === r) {
        video.srcObject = null;
        setPlaying(false);
        if (!$('error').textContent) setStatus('stopped');
      }
      // The event stream ends by itself after the `ended` event; do not wait for ever.
      setTimeout(() => r.sse && r.sse.abort(), 5000);
      renderAll(r);
    })();
    return r.stopping;
  }

  function alive(r) {
    if (r.stopped) throw new Error('stopped');
  }

  /// A failure after the play started (the peer connection failed): shown, and the play stops.
  function fatal(r, err) {
    if (r.stopped) return;
    logLine(r, `fatal: ${err.message}`);
    setError(err.message);
    setStatus('failed');
    r.failWith(err);
    if (!TEST) stop(r);
  }

  // ---------------------------------------------------------------------------------------
  // The broker: allocate, follow

  async function allocate(r) {
    const body = { game: r.game, tier: r.tier, player_id: `web-${randomHex(8)}` };
    if (r.genre) body.genre = r.genre;
    if (config.region) body.regions = [{ name: config.region, rtt_ms: 0 }];
    setStatus('allocating…');
    const resp = await request('POST /v1/sessions', '/v1/sessions', {
      method: 'POST',
      headers: { ...auth(r), 'Content-Type': 'application/json' },
      body: JSON.stringify(body),
    });
    if (resp.status !== 201 && resp.status !== 202) {
      throw new Error(`POST /v1/sessions: ${await problemText(resp)}`);
    }
    let view = await resp.json();
    r.sessionId = view.session_id;
    logLine(r, `POST /v1/sessions → ${resp.status} ${view.state} ${view.session_id}`);
    showView(r, view);
    if (view.state === 'ended') throw new Error(`the session ended (${view.end_reason})`);
    if (!PLACED.has(view.state)) {
      view = await watch(r); // queued: the `reserved` event carries whep_url and token
    }
    if (!view.whep_url || !view.token) {
      // After a broker restart the events may lack them; the session's own view has what
      // the broker knows.
      view = await getSession(r);
      showView(r, view);
    }
    if (!view.whep_url || !view.token) {
      throw new Error(`session ${r.sessionId} is ${view.state} without whep_url and token`);
    }
    mark(r, 'allocated');
    return view;
  }

  /// Follows GET /v1/sessions/{id}/events. Resolves with the first placed view (rejects if
  /// the session ends or the stream closes first) and goes on showing every state after it.
  function watch(r) {
    const ctl = new AbortController();
    r.sse = ctl;
    let settled = false;
    let resolve;
    let reject;
    const placed = new Promise((res, rej) => {
      resolve = res;
      reject = rej;
    });
    const settle = (f, v) => {
      if (!settled) {
        settled = true;
        f(v);
      }
    };
    placed.catch(() => {}); // a 201's watch is not awaited
    (async () => {
      const resp = await fetch(`/v1/sessions/${encodeURIComponent(r.sessionId)}/events`, {
        headers: auth(r),
        signal: ctl.signal,
        cache: 'no-store',
      });
      if (!resp.ok) throw new Error(`events: ${await problemText(resp)}`);
      await readSse(resp.body, (event, data) => {
        if (event !== 'session') return;
        let v;
        try {
          v = JSON.parse(data);
        } catch (e) {
          logLine(r, `events: not JSON: ${data.slice(0, 80)}`);
          return;
        }
        showView(r, v);
        if (v.state === 'ended') {
          settle(reject, new Error(`the session ended (${v.end_reason})`));
          if (!r.stopped && run === r && r.pc) fatal(r, new Error(`the session ended (${v.end_reason})`));
        } else if (PLACED.has(v.state)) {
          settle(resolve, v);
        }
      });
      settle(reject, new Error('the event stream closed before the session was placed'));
    })().catch((e) => {
      if (e.name === 'AbortError') {
        settle(reject, new Error('stopped'));
      } else {
        logLine(r, `events: ${e.message}`);
        settle(reject, e);
      }
    });
    return placed;
  }

  /// Reads a text/event-stream body, calling onEvent(event, data) per event (the format of
  /// the HTML standard: `field: value` lines, an empty line ends an event).
  async function readSse(body, onEvent) {
    const reader = body.getReader();
    const decoder = new TextDecoder();
    let buf = '';
    let event = '';
    let data = [];
    const line = (l) => {
      if (l === '') {
        if (data.length) onEvent(event || 'message', data.join('\n'));
        event = '';
        data = [];
        return;
      }
      if (l.startsWith(':')) return; // a comment: keep-alive
      const i = l.indexOf(':');
      const field = i < 0 ? l : l.slice(0, i);
      let value = i < 0 ? '' : l.slice(i + 1);
      if (value.startsWith(' ')) value = value.slice(1);
      if (field === 'event') event = value;
      else if (field === 'data') data.push(value);
    };
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buf += decoder.decode(value, { stream: true });
      // A chunk ending in CR may be the first half of CRLF: keep it for the next one.
      let hold = '';
      if (buf.endsWith('\r')) {
        hold = '\r';
        buf = buf.slice(0, -1);
      }
      const lines = buf.split(/\r\n|\r|\n/);
      buf = lines.pop() + hold;
      for (const l of lines) line(l);
    }
  }

  async function getSession(r) {
    const path = `/v1/sessions/${encodeURIComponent(r.sessionId)}`;
    const resp = await request(`GET ${path}`, path, {
      headers: auth(r),
      cache: 'no-store',
      signal: timeoutSignal(3000),
    });
    if (!resp.ok) throw new Error(`GET /v1/sessions/${r.sessionId}: ${await problemText(resp)}`);
    return resp.json();
  }

  function showView(r, v) {
    r.view = v;
    if (v.node_id) r.nodeId = v.node_id;
    if (v.tier) r.servedTier = v.tier;
    if (run !== r) return;
    let s;
    if (v.state === 'queued') {
      s = `queued, position ${v.queue_position ?? '?'}`;
      if (v.eta_seconds != null) s += `, eta ${v.eta_seconds} s`;
    } else if (v.state === 'ended') {
      s = `ended (${v.end_reason})`;
    } else {
      s = `${v.state}${v.node_id ? ` on ${v.node_id}` : ''}, ${v.game} ${v.tier} ${v.genre}`;
    }
    setStatus(s);
    logLine(r, `session ${v.state}${v.end_reason ? ` (${v.end_reason})` : ''}`);
  }

  // ---------------------------------------------------------------------------------------
  // WHEP

  async function connect(r, view) {
    r.whepUrl = view.whep_url;
    r.token = view.token;
    // max-bundle: one transport, so ICE gathers (and trickles) for the first section only.
    const pc = new RTCPeerConnection({ bundlePolicy: 'max-bundle' });
    r.pc = pc;
    preferH264(pc.addTransceiver('video', { direction: 'recvonly' }));
    const dc = pc.createDataChannel('input', { ordered: false, maxRetransmits: 0 });
    dc.binaryType = 'arraybuffer';
    r.dc = dc;
    dc.onopen = () => {
      if (r.stopped) return;
      logLine(r, 'input channel open');
      sendPing(r);
      r.timers.push(setInterval(() => sendPing(r), 1000));
    };
    dc.onclose = () => logLine(r, 'input channel closed');
    dc.onmessage = (e) => onChannelMessage(r, e.data);
    pc.ontrack = (e) => {
      logLine(r, `track ${e.track.kind}`);
      if (e.track.kind !== 'video' || run !== r) return;
      video.srcObject = e.streams[0] || new MediaStream([e.track]);
      const p = video.play();
      if (p) p.catch((err) => logLine(r, `video.play: ${err.message}`));
    };
    pc.onicecandidate = (e) => onLocalCandidate(r, e.candidate);
    pc.oniceconnectionstatechange = () => {
      const s = pc.iceConnectionState;
      logLine(r, `ICE ${s}`);
      if (s === 'connected' || s === 'completed') mark(r, 'ice_connected');
    };
    pc.onconnectionstatechange = () => {
      const s = pc.connectionState;
      logLine(r, `connection ${s}`);
      if (s === 'connected') mark(r, 'connected');
      if (s === 'failed') fatal(r, new Error('the peer connection failed'));
    };

    const offer = await pc.createOffer();
    await pc.setLocalDescription(offer);
    const sdp = pc.localDescription.sdp;
    r.ufrag = sdpAttr(sdp, 'ice-ufrag');
    r.pwd = sdpAttr(sdp, 'ice-pwd');
    r.mids = sdpMids(sdp);
    // Post at once: waiting for ICE gathering costs Chrome 150–200 ms; candidates trickle.
    setStatus('connecting…');
    mark(r, 'offer_sent');
    const resp = await request('WHEP POST', r.whepUrl, {
      method: 'POST',
      headers: { Authorization: `Bearer ${r.token}`, 'Content-Type': 'application/sdp' },
      body: sdp,
    });
    if (resp.status !== 201) throw new Error(`WHEP POST: ${await problemText(resp)}`);
    const answer = await resp.text();
    mark(r, 'answer');
    const loc = resp.headers.get('Location');
    if (!loc) {
      throw new Error('the WHEP answer has no Location header (Access-Control-Expose-Headers?)');
    }
    r.location = new URL(loc, r.whepUrl).href;
    logLine(r, `WHEP 201, stream ${r.location}`);
    alive(r);
    await pc.setRemoteDescription({ type: 'answer', sdp: answer });
    flushCandidates(r);
  }

  /// Puts H.264 first in the offer, Constrained Baseline with packetization-mode=1 (what the
  /// agent sends) ahead of the other profiles; the other codecs stay, after it.
  function preferH264(transceiver) {
    if (!transceiver.setCodecPreferences || !window.RTCRtpReceiver || !RTCRtpReceiver.getCapabilities) return;
    const caps = RTCRtpReceiver.getCapabilities('video');
    if (!caps) return;
    const rank = (c) => {
      if (c.mimeType.toLowerCase() !== 'video/h264') return 9;
      const f = (c.sdpFmtpLine || '').toLowerCase();
      const pm1 = f.includes('packetization-mode=1') ? 0 : 2;
      const cb = /profile-level-id=42e0/.test(f) ? 0 : /profile-level-id=4200/.test(f) ? 0.5 : 1;
      return pm1 + cb;
    };
    const codecs = caps.codecs.slice().sort((a, b) => rank(a) - rank(b)); // stable
    if (codecs.length && rank(codecs[0]) < 9) {
      try {
        transceiver.setCodecPreferences(codecs);
      } catch (e) {
        // the browser's default order then; the agent still picks H.264
      }
    }
  }

  function onLocalCandidate(r, c) {
    if (r.stopped) return;
    if (!c) {
      r.gatheringDone = true;
    } else if (c.candidate) {
      r.candidates.push(c);
    } else {
      return; // an empty candidate ends one generation; the null one ends gathering
    }
    // Before the answer there is no stream to PATCH: batch until then.
    if (r.location) flushCandidates(r);
  }

  /// Sends the candidates gathered since the last PATCH (RFC 8840 fragment), and
  /// `a=end-of-candidates` once gathering is done. PATCH failures are logged, not fatal.
  function flushCandidates(r) {
    const cands = r.candidates;
    r.candidates = [];
    const end = r.gatheringDone && !r.endSent;
    if (end) r.endSent = true;
    if (!cands.length && !end) return;
    const frag = sdpFrag(r, cands, end);
    const url = r.location;
    r.patches = r.patches.then(async () => {
      if (r.stopped) return;
      try {
        const resp = await fetch(url, {
          method: 'PATCH',
          headers: {
            Authorization: `Bearer ${r.token}`,
            'Content-Type': 'application/trickle-ice-sdpfrag',
          },
          body: frag,
        });
        const what = `${cands.length} candidate(s)${end ? ' + end-of-candidates' : ''}`;
        if (resp.ok) logLine(r, `PATCH ${what} → ${resp.status}`);
        else logLine(r, `PATCH ${what} → ${await problemText(resp)}`);
      } catch (e) {
        logLine(r, `PATCH failed: ${e.message}`);
      }
    });
  }

  function sdpFrag(r, cands, end) {
    const firstMid = r.mids.keys().next().value ?? '0';
    const byMid = new Map();
    for (const c of cands) {
      const mid = c.sdpMid ?? firstMid;
      if (!byMid.has(mid)) byMid.set(mid, []);
      byMid.get(mid).push(c);
    }
    if (!byMid.size) byMid.set(firstMid, []);
    const lines = [`a=ice-ufrag:${r.ufrag}`, `a=ice-pwd:${r.pwd}`];
    for (const [mid, list] of byMid) {
      const kind = r.mids.get(mid) || 'video';
      lines.push(
        kind === 'application'
          ? 'm=application 9 UDP/DTLS/SCTP webrtc-datachannel'
          : `m=${kind} 9 UDP/TLS/RTP/SAVPF 0`,
      );
      lines.push(`a=mid:${mid}`);
      for (const c of list) lines.push(`a=${c.candidate}`);
      if (end) lines.push('a=end-of-candidates');
    }
    return `${lines.join('\r\n')}\r\n`;
  }

  function sdpAttr(sdp, name) {
    const m = sdp.match(new RegExp(`^a=${name}:(.*)$`, 'm'));
    return m ? m[1].trim() : '';
  }

  function sdpMids(sdp) {
    const mids = new Map();
    for (const section of sdp.split(/\r?\n(?=m=)/).slice(1)) {
      const kind = section.slice(2, section.indexOf(' '));
      const mid = section.match(/^a=mid:(.*)$/m);
      if (mid) mids.set(mid[1].trim(), kind);
    }
    return mids;
  }

  // ---------------------------------------------------------------------------------------
  // Frames and picture markers

  function startFrameLoop(r) {
    if (!('requestVideoFrameCallback' in HTMLVideoElement.prototype)) {
      logLine(r, 'this browser has no requestVideoFrameCallback: no first-frame time, no markers');
      return;
    }
    const onFrame = (now, meta) => {
      if (run !== r || r.stopped) return;
      if (r.firstFrame === null) {
        r.firstFrame = now;
        mark(r, 'first_frame', now);
        r.onFirstFrame(now);
      }
      readMarkers(r, meta.height || video.videoHeight, now);
      video.requestVideoFrameCallback(onFrame);
    };
    video.requestVideoFrameCallback(onFrame);
  }

  /// Reads the two marker rows (frame counter, newest input seq applied) from the top-left
  /// corner of the frame on screen, and closes the input → frame measurements it answers.
  function readMarkers(r, height, now) {
    const b = Math.max(4, Math.floor(height / 45));
    if (b < 2 || !markerCtx) return null;
    const w = 24 * b;
    const h = 2 * b;
    if (markerCanvas.width !== w || markerCanvas.height !== h) {
      markerCanvas.width = w;
      markerCanvas.height = h;
    }
    let px;
    try {
      markerCtx.drawImage(video, 0, 0, w, h, 0, 0, w, h);
      px = markerCtx.getImageData(0, 0, w, h).data;
    } catch (e) {
      return null; // no frame yet
    }
    const row = (k) => {
      let v = 0;
      const y = k * b + (b >> 1);
      for (let i = 0; i < 24; i++) {
        const o = (y * w + i * b + (b >> 1)) * 4;
        v = v * 2 + ((px[o] + px[o + 1] + px[o + 2]) / 3 > 128 ? 1 : 0);
      }
      return v;
    };
    const m = { frame: row(0), seq: row(1) };
    r.markersRead += 1;
    r.marker = m;
    // Every pending event up to the seq shown has reached the picture; the earliest of them
    // waited longest, and its wait is this frame's input → frame latency.
    let earliest = null;
    while (r.pending.length && seqReached(r.pending[0].seq, m.seq)) {
      const p = r.pending.shift();
      if (earliest === null) earliest = p;
    }
    if (earliest !== null) {
      const lat = round1(now - earliest.t);
      r.latencies.push(lat);
      logLine(r, `input ${earliest.seq} → frame ${m.frame}: ${lat} ms`);
    }
    return m;
  }

  function seqReached(sent, shown) {
    const d = (shown - (sent & MARKER_MASK)) & MARKER_MASK;
    return d < 0x800000;
  }

  // ---------------------------------------------------------------------------------------
  // Stats

  async function pollStats(r) {
    if (!r.pc || r.stopped) return;
    try {
      r.stats = await readStats(r);
    } catch (e) {
      logLine(r, `getStats: ${e.message}`);
    }
    renderStats(r);
  }

  async function readStats(r) {
    const report = await r.pc.getStats();
    let inbound = null;
    let transport = null;
    const pairs = [];
    report.forEach((s) => {
      if (s.type === 'inbound-rtp' && (s.kind || s.mediaType) === 'video') inbound = s;
      else if (s.type === 'transport') transport = s;
      else if (s.type === 'candidate-pair') pairs.push(s);
    });
    let pair = transport && transport.selectedCandidatePairId
      ? report.get(transport.selectedCandidatePairId)
      : null;
    if (!pair) pair = pairs.find((p) => p.nominated && p.state === 'succeeded') || null;
    const codec = inbound && inbound.codecId ? report.get(inbound.codecId) : null;
    let kbps = r.stats ? r.stats.kbps : null;
    if (inbound && r.prevBytes && inbound.timestamp > r.prevBytes.t) {
      kbps = ((inbound.bytesReceived - r.prevBytes.bytes) * 8) / (inbound.timestamp - r.prevBytes.t);
    }
    if (inbound) r.prevBytes = { t: inbound.timestamp, bytes: inbound.bytesReceived };
    const n = (v) => (v === undefined ? null : v);
    return {
      codec: codec ? n(codec.mimeType) : null,
      fmtp: codec ? n(codec.sdpFmtpLine) : null,
      width: inbound ? n(inbound.frameWidth) : null,
      height: inbound ? n(inbound.frameHeight) : null,
      fps: inbound ? n(inbound.framesPerSecond) : null,
      frames_decoded: inbound ? n(inbound.framesDecoded) : null,
      frames_dropped: inbound ? n(inbound.framesDropped) : null,
      key_frames_decoded: inbound ? n(inbound.keyFramesDecoded) : null,
      packets_lost: inbound ? n(inbound.packetsLost) : null,
      packets_received: inbound ? n(inbound.packetsReceived) : null,
      bytes_received: inbound ? n(inbound.bytesReceived) : null,
      pli_count: inbound ? n(inbound.pliCount) : null,
      freeze_count: inbound ? n(inbound.freezeCount) : null,
      kbps,
      rtt_ms: pair && pair.currentRoundTripTime != null ? round2(pair.currentRoundTripTime * 1000) : null,
    };
  }

  // ---------------------------------------------------------------------------------------
  // Input

  /// Sends one event on the input channel; returns its seq, or 0 when the channel is not open.
  function sendEvent(r, kind, payloadLen, write) {
    const dc = r && r.dc;
    if (!dc || dc.readyState !== 'open' || r.stopped) return 0;
    const buf = new ArrayBuffer(HEADER + payloadLen);
    const v = new DataView(buf);
    const seq = (r.seq + 1) >>> 0;
    const t = performance.now();
    v.setUint8(0, kind);
    v.setUint32(1, seq, true);
    v.setUint32(5, Math.floor(t) >>> 0, true);
    if (write) write(v);
    try {
      dc.send(buf);
    } catch (e) {
      logLine(r, `input send: ${e.message}`);
      return 0;
    }
    r.seq = seq;
    if (kind === KIND.PING) {
      r.pings.set(seq, t);
      return seq;
    }
    if (r.gameSent === 0) r.markerBefore = r.marker ? r.marker.seq : null;
    r.gameSent += 1;
    r.lastGameSeq = seq;
    r.pending.push({ seq, t });
    if (r.pending.length > 2000) r.pending.shift(); // no markers (not the synthetic game)
    return seq;
  }

  const keyEvent = (r, kind, code) => sendEvent(r, kind, 2, (v) => v.setUint16(HEADER, code, true));
  const buttonEvent = (r, kind, button) => sendEvent(r, kind, 1, (v) => v.setUint8(HEADER, button));
  const pairEvent = (r, kind, x, y) =>
    sendEvent(r, kind, 4, (v) => {
      v.setInt16(HEADER, clampI16(x), true);
      v.setInt16(HEADER + 2, clampI16(y), true);
    });

  const padButtonEvent = (r, pad, button, value) =>
    sendEvent(r, KIND.PAD_BUTTON, 3, (v) => {
      v.setUint8(HEADER, pad);
      v.setUint8(HEADER + 1, button);
      v.setUint8(HEADER + 2, value);
    });
  const padAxisEvent = (r, pad, axis, value) =>
    sendEvent(r, KIND.PAD_AXIS, 4, (v) => {
      v.setUint8(HEADER, pad);
      v.setUint8(HEADER + 1, axis);
      v.setInt16(HEADER + 2, value, true);
    });

  // Gamepads (W3C standard mapping): polled every animation frame while playing; a button
  // is sent when its pressure changes by a step, an axis when it moves past a small dead zone.
  const padState = new Map(); // pad index → { buttons: [u8], axes: [i16] }
  const AXIS_DEAD_ZONE = 0.08;

  function pollGamepads() {
    requestAnimationFrame(pollGamepads);
    if (!playing() || !navigator.getGamepads) return;
    for (const gp of navigator.getGamepads()) {
      if (!gp || gp.index > 255) continue;
      let st = padState.get(gp.index);
      if (!st) {
        st = { buttons: [], axes: [] };
        padState.set(gp.index, st);
      }
      gp.buttons.forEach((b, i) => {
        if (i > 255) return;
        const value = Math.round(Math.min(1, Math.max(0, b.value)) * 255);
        if (value !== (st.buttons[i] || 0)) {
          st.buttons[i] = value;
          padButtonEvent(run, gp.index, i, value);
        }
      });
      gp.axes.forEach((a, i) => {
        if (i > 255) return;
        const shaped = Math.abs(a) < AXIS_DEAD_ZONE ? 0 : a;
        const value = Math.round(Math.min(1, Math.max(-1, shaped)) * 32767);
        if (Math.abs(value - (st.axes[i] || 0)) >= 256 || (value === 0 && st.axes[i])) {
          st.axes[i] = value;
          padAxisEvent(run, gp.index, i, value);
        }
      });
    }
  }

  function sendPing(r) {
    sendEvent(r, KIND.PING, 0, null);
    // Pongs lost on the unreliable channel must not pile up.
    const old = performance.now() - 10000;
    for (const [seq, t] of r.pings) if (t < old) r.pings.delete(seq);
  }

  function onChannelMessage(r, data) {
    if (!(data instanceof ArrayBuffer) || data.byteLength < HEADER) return;
    const v = new DataView(data);
    if (v.getUint8(0) !== KIND.PONG) return;
    const seq = v.getUint32(1, true);
    const now = performance.now();
    const sent = r.pings.get(seq);
    let rtt;
    if (sent !== undefined) {
      r.pings.delete(seq);
      rtt = now - sent;
    } else {
      rtt = ((Math.floor(now) >>> 0) - v.getUint32(5, true)) >>> 0; // from the echoed t_ms
      if (rtt > 60000) return;
    }
    r.inputRtts.push(round2(rtt));
  }

  const held = new Set();

  function playing() {
    return run && !run.stopped && run.dc && run.dc.readyState === 'open';
  }

  function wireInput() {
    requestAnimationFrame(pollGamepads);
    window.addEventListener('gamepaddisconnected', (e) => padState.delete(e.gamepad.index));
    const formTarget = (e) => e.target instanceof HTMLElement && e.target.closest('input, select, textarea, button');
    document.addEventListener('keydown', (e) => {
      if (!playing() || formTarget(e)) return;
      const code = HID[e.code];
      if (code === undefined) return;
      e.preventDefault();
      if (e.repeat || held.has(code)) return;
      held.add(code);
      keyEvent(run, KIND.KEY_DOWN, code);
    });
    document.addEventListener('keyup', (e) => {
      const code = HID[e.code];
      if (code === undefined || !held.has(code)) return;
      e.preventDefault();
      held.delete(code);
      if (playing()) keyEvent(run, KIND.KEY_UP, code);
    });
    window.addEventListener('blur', () => releaseHeldKeys(run));

    video.addEventListener('click', () => {
      video.focus();
      if (!playing() || document.pointerLockElement === video) return;
      try {
        const p = video.requestPointerLock();
        if (p && p.catch) p.catch(() => {});
      } catch (e) {
        // pointer lock is a nicety; buttons and keys work without it
      }
    });
    document.addEventListener('pointerlockchange', () => {
      $('hint').textContent = document.pointerLockElement === video
        ? 'Mouse captured: Esc releases it.'
        : 'Click the picture to capture the mouse; keys go to the game while it plays.';
    });
    let dx = 0;
    let dy = 0;
    let scheduled = false;
    document.addEventListener('mousemove', (e) => {
      if (document.pointerLockElement !== video || !playing()) return;
      const s = streamScale();
      dx += e.movementX * s;
      dy += e.movementY * s;
      if (scheduled) return;
      scheduled = true;
      // One mouse-move per display frame: a 1000 Hz mouse would flood the channel.
      requestAnimationFrame(() => {
        scheduled = false;
        const x = Math.round(dx);
        const y = Math.round(dy);
        dx -= x;
        dy -= y;
        if ((x || y) && playing()) pairEvent(run, KIND.MOUSE_MOVE, x, y);
      });
    });
    video.addEventListener('mousedown', (e) => {
      if (playing() && e.button <= 2) buttonEvent(run, KIND.MOUSE_DOWN, e.button);
    });
    video.addEventListener('mouseup', (e) => {
      if (playing() && e.button <= 2) buttonEvent(run, KIND.MOUSE_UP, e.button);
    });
    video.addEventListener('contextmenu', (e) => e.preventDefault());
    video.addEventListener(
      'wheel',
      (e) => {
        if (!playing()) return;
        e.preventDefault();
        const unit = e.deltaMode === 1 ? 16 : e.deltaMode === 2 ? video.clientHeight : 1;
        pairEvent(run, KIND.WHEEL, Math.round(e.deltaX * unit), Math.round(e.deltaY * unit));
      },
      { passive: false },
    );
  }

  function releaseHeldKeys(r) {
    for (const code of held) if (r && !r.stopped) keyEvent(r, KIND.KEY_UP, code);
    held.clear();
  }

  /// Stream pixels per CSS pixel of the picture on screen (mouse moves are in stream pixels).
  function streamScale() {
    const vw = video.videoWidth;
    const vh = video.videoHeight;
    if (!vw || !vh || !video.clientWidth || !video.clientHeight) return 1;
    const shown = Math.min(video.clientWidth / vw, video.clientHeight / vh); // object-fit: contain
    return shown > 0 ? 1 / shown : 1;
  }

  function hidUsages() {
    const m = {};
    for (let i = 0; i < 26; i++) m[`Key${String.fromCharCode(65 + i)}`] = 0x04 + i;
    for (let i = 1; i <= 9; i++) m[`Digit${i}`] = 0x1e + i - 1;
    m.Digit0 = 0x27;
    Object.assign(m, {
      Enter: 0x28, Escape: 0x29, Backspace: 0x2a, Tab: 0x2b, Space: 0x2c,
      Minus: 0x2d, Equal: 0x2e, BracketLeft: 0x2f, BracketRight: 0x30, Backslash: 0x31,
      Semicolon: 0x33, Quote: 0x34, Backquote: 0x35, Comma: 0x36, Period: 0x37, Slash: 0x38,
      CapsLock: 0x39,
      Insert: 0x49, Home: 0x4a, PageUp: 0x4b, Delete: 0x4c, End: 0x4d, PageDown: 0x4e,
      ArrowRight: 0x4f, ArrowLeft: 0x50, ArrowDown: 0x51, ArrowUp: 0x52,
      ControlLeft: 0xe0, ShiftLeft: 0xe1, AltLeft: 0xe2, MetaLeft: 0xe3,
      ControlRight: 0xe4, ShiftRight: 0xe5, AltRight: 0xe6, MetaRight: 0xe7,
    });
    for (let i = 1; i <= 12; i++) m[`F${i}`] = 0x3a + i - 1;
    return m;
  }

  // ---------------------------------------------------------------------------------------
  // Test mode: /?autoplay=1&game=G&tier=T&genre=N&seconds=5&inputs=10&report=URL

  async function testMode() {
    const seconds = numberParam('seconds', 5, 0.5, 600);
    const inputs = Math.round(numberParam('inputs', 10, 0, 10000));
    const limitS = numberParam('timeout', Math.max(20, seconds + 15), 1, 3600);
    const reportUrl = query.get('report');
    let step = 'start';
    let r = null;
    let playSeconds = null;
    let ended = null;
    let done = false;

    const finish = async (err) => {
      if (done) return;
      done = true;
      clearTimeout(timer);
      r = r || run; // a play that failed before play() returned
      if (err && r) {
        logLine(r, `test failed at ${step}: ${err.message}`);
        // Leave nothing behind, but report even if the cleanup hangs.
        await Promise.race([stop(r), sleep(3000)]);
      }
      const rep = buildReport(r, err ? `${step}: ${err.message}` : null, playSeconds, ended);
      window.framecastReport = rep;
      document.title = rep.ok ? 'framecast: pass' : 'framecast: fail';
      const text = JSON.stringify(rep);
      console.log(`FRAMECAST_REPORT ${text}`);
      if (reportUrl) {
        try {
          await fetch(reportUrl, {
            method: 'POST',
            mode: 'no-cors',
            headers: { 'Content-Type': 'text/plain' },
            body: text,
          });
        } catch (e) {
          console.log(`report POST failed: ${e.message}`);
        }
      }
    };
    const timer = setTimeout(
      () => finish(new Error(`the test took longer than ${limitS} s`)),
      limitS * 1000,
    );

    try {
      const key = query.get('key') || config.api_key;
      if (!key) throw new Error('no API key: neither ?key= nor /player/config.json has one');
      const opts = {
        key,
        game: query.get('game') || $('game').value,
        tier: query.get('tier') || $('tier').value,
        genre: query.get('genre') || '',
      };
      step = 'play';
      r = await play(opts);
      const race = (p) => Promise.race([p, r.fatal]);
      step = 'first frame';
      const first = await race(r.firstFramePromise);
      step = 'input channel';
      if (inputs > 0) await race(channelOpen(r.dc));
      step = 'play time';
      const n = 2 * inputs;
      const span = seconds * 1000 * 0.75; // the last quarter lets the last input show
      for (let k = 0; k < n; k++) {
        await race(sleepUntil(first + ((k + 0.5) * span) / n));
        alive(r);
        const seq = keyEvent(r, k % 2 === 0 ? KIND.KEY_DOWN : KIND.KEY_UP, HID_RIGHT_ARROW);
        if (!seq) throw new Error('the input channel closed');
      }
      await race(sleepUntil(first + seconds * 1000));
      playSeconds = round2((performance.now() - first) / 1000);
      step = 'final stats';
      r.stats = await readStats(r);
      readMarkers(r, video.videoHeight, performance.now());
      renderAll(r);
      step = 'stop';
      await stop(r);
      if (r.whepDeleteStatus === null || r.whepDeleteStatus < 200 || r.whepDeleteStatus > 299) {
        throw new Error(`the WHEP DELETE answered ${r.whepDeleteStatus ?? 'nothing'}`);
      }
      step = 'session end';
      const deadline = performance.now() + 5000;
      let last = null;
      for (;;) {
        try {
          ended = await getSession(r);
          last = ended.state;
        } catch (e) {
          // The broker drops a live session a moment before it lists the ended one (while it
          // writes the end to its store): a 404 then is not the answer yet.
          last = e.message;
          logLine(r, e.message);
        }
        if ((ended && ended.state === 'ended') || performance.now() > deadline) break;
        await sleep(100);
      }
      if (!ended || ended.state !== 'ended') {
        throw new Error(`5 s after Stop the session is not ended: ${last}`);
      }
      await finish(null);
    } catch (e) {
      await finish(e);
    }
  }

  function buildReport(r, error, playSeconds, ended) {
    const marks = {};
    for (const m of MARK_NAMES) marks[m] = r && r.marks[m] !== undefined ? r.marks[m] : null;
    const s = (r && r.stats) || {};
    const pick = (k) => (s[k] === undefined ? null : s[k]);
    return {
      ok: error === null,
      error,
      session_id: r ? r.sessionId : null,
      node_id: r ? r.nodeId : null,
      tier: r ? r.servedTier || r.tier : null,
      marks,
      ttff_ms: marks.first_frame,
      play_seconds: playSeconds,
      video: {
        codec: pick('codec'),
        fmtp: pick('fmtp'),
        width: pick('width'),
        height: pick('height'),
        frames_decoded: pick('frames_decoded'),
        frames_dropped: pick('frames_dropped'),
        key_frames_decoded: pick('key_frames_decoded'),
        fps: pick('fps'),
        packets_lost: pick('packets_lost'),
        packets_received: pick('packets_received'),
        bytes_received: pick('bytes_received'),
        pli_count: pick('pli_count'),
        freeze_count: pick('freeze_count'),
      },
      rtt_ms: pick('rtt_ms'),
      input_rtt_ms: r ? r.inputRtts.slice() : [],
      input: {
        sent: r ? r.gameSent : 0,
        last_seq_sent: r ? r.lastGameSeq : 0,
        marker_seq_before: r ? r.markerBefore : null,
        marker_seq_after: r && r.marker ? r.marker.seq : null,
        latency_ms: r ? r.latencies.slice() : [],
      },
      markers_read: r ? r.markersRead : 0,
      ended_state: ended ? ended.state : null,
      end_reason: ended && ended.end_reason ? ended.end_reason : null,
      log: r ? r.log.slice(-200) : pageLog.slice(),
    };
  }

  function channelOpen(dc) {
    if (dc.readyState === 'open') return Promise.resolve();
    return new Promise((resolve, reject) => {
      dc.addEventListener('open', () => resolve(), { once: true });
      dc.addEventListener('close', () => reject(new Error('the input channel closed')), { once: true });
    });
  }

  function numberParam(name, dflt, min, max) {
    const v = Number(query.get(name));
    if (query.get(name) === null || !Number.isFinite(v)) return dflt;
    return Math.min(max, Math.max(min, v));
  }

  // ---------------------------------------------------------------------------------------
  // Page

  function wireControls() {
    $('controls').addEventListener('submit', (e) => {
      e.preventDefault();
      const opts = {
        key: $('key').value.trim(),
        game: $('game').value,
        tier: $('tier').value,
        genre: $('genre').value,
      };
      play(opts).then(() => video.focus(), () => {});
    });
    $('stop').addEventListener('click', () => {
      if (run) stop(run);
    });
    $('game').addEventListener('change', () => {
      const g = config.games.find((x) => x.id === $('game').value);
      if (g) $('genre').value = g.genre;
      fillTiers();
    });
  }

  function fillControls() {
    const options = (sel, items) => {
      sel.textContent = '';
      for (const [value, label] of items) {
        const o = document.createElement('option');
        o.value = value;
        o.textContent = label;
        sel.append(o);
      }
    };
    options($('game'), config.games.map((g) => [g.id, `${g.id} (${g.genre})`]));
    options($('genre'), config.genres.map((g) => [g, g]));
    const game = query.get('game');
    if (game && config.games.some((g) => g.id === game)) $('game').value = game;
    const g = config.games.find((x) => x.id === $('game').value);
    if (g) $('genre').value = g.genre;
    const genre = query.get('genre');
    if (genre && config.genres.includes(genre)) $('genre').value = genre;
    fillTiers();
    $('key').value = query.get('key') || config.api_key || '';
  }

  function fillTiers() {
    const sel = $('tier');
    const before = query.get('tier') || sel.value || '720p';
    const g = config.games.find((x) => x.id === $('game').value);
    const tiers = config.tiers.filter((t) => !g || !g.tiers || !g.tiers.length || g.tiers.includes(t.name));
    sel.textContent = '';
    for (const t of tiers) {
      const o = document.createElement('option');
      o.value = t.name;
      o.textContent = `${t.name} (${t.width}×${t.height} @ ${t.fps})`;
      sel.append(o);
    }
    if (tiers.some((t) => t.name === before)) sel.value = before;
  }

  function setPlaying(on) {
    $('play').disabled = on;
    $('stop').disabled = !on;
  }

  function setStatus(s) {
    $('status').textContent = s;
  }

  function setError(s) {
    $('error').textContent = s;
  }

  function mark(r, name, at) {
    if (r.marks[name] !== undefined) return;
    r.marks[name] = round1((at === undefined ? performance.now() : at) - r.t0);
    logLine(r, `mark ${name}`);
    renderMarks(r);
  }

  function logLine(r, msg) {
    const line = r ? `${(performance.now() - r.t0).toFixed(1)} ms ${msg}` : msg;
    const lines = r ? r.log : pageLog;
    lines.push(line);
    if (lines.length > 500) lines.shift();
    if (!r || run === r) {
      const el = $('log');
      el.textContent += `${line}\n`;
      el.scrollTop = el.scrollHeight;
    }
    console.log(`[player] ${line}`);
  }

  function renderAll(r) {
    if (r === run && r.log.length === 0) $('log').textContent = '';
    renderStats(r);
    renderMarks(r);
    renderInput(r);
  }

  function table(el, rows) {
    el.textContent = '';
    for (const [k, v] of rows) {
      const tr = document.createElement('tr');
      const a = document.createElement('td');
      const b = document.createElement('td');
      a.textContent = k;
      b.textContent = v === null || v === undefined || v === '' ? '–' : String(v);
      tr.append(a, b);
      el.append(tr);
    }
  }

  function renderStats(r) {
    if (run !== r) return;
    const s = r.stats || {};
    const lost = s.packets_lost;
    const got = s.packets_received;
    const loss = lost != null && got != null && lost + got > 0 ? `${((100 * lost) / (lost + got)).toFixed(2)} %` : null;
    table($('stats'), [
      ['resolution', s.width != null ? `${s.width}×${s.height}` : null],
      ['fps', s.fps],
      ['bitrate', s.kbps != null ? `${Math.round(s.kbps)} kbit/s` : null],
      ['RTT', s.rtt_ms != null ? `${s.rtt_ms} ms` : null],
      ['packet loss', loss],
      ['codec', s.codec ? `${s.codec}${s.fmtp ? ` ${s.fmtp.replaceAll(';', '; ')}` : ''}` : null],
      ['frames decoded / dropped', s.frames_decoded != null ? `${s.frames_decoded} / ${s.frames_dropped ?? '–'}` : null],
      ['key frames decoded', s.key_frames_decoded],
      ['PLIs sent / freezes', s.pli_count != null ? `${s.pli_count} / ${s.freeze_count ?? '–'}` : null],
      ['session', r.sessionId ? `${r.sessionId}${r.nodeId ? ` on ${r.nodeId}` : ''}` : null],
    ]);
  }

  function renderMarks(r) {
    if (run !== r) return;
    table($('marks'), MARK_NAMES.map((m) => [m, r.marks[m] !== undefined ? r.marks[m].toFixed(1) : null]));
  }

  function renderInput(r) {
    if (run !== r) return;
    const lat = r.latencies;
    const rtts = r.inputRtts;
    table($('input'), [
      ['input RTT (last / median)', rtts.length ? `${last(rtts).toFixed(2)} / ${median(rtts).toFixed(2)} ms` : null],
      ['input → frame (last / median)', lat.length ? `${last(lat).toFixed(1)} / ${median(lat).toFixed(1)} ms` : null],
      ['inputs sent (last seq)', `${r.gameSent} (${r.lastGameSeq})`],
      ['marker: frame', r.marker ? r.marker.frame : null],
      ['marker: input seq', r.marker ? r.marker.seq : null],
      ['markers read', r.markersRead],
    ]);
  }

  // ---------------------------------------------------------------------------------------
  // Helpers

  /// fetch() with what was asked in its error: a bare 'Failed to fetch' says nothing.
  async function request(what, url, init) {
    try {
      return await fetch(url, init);
    } catch (e) {
      throw new Error(`${what} ${url}: ${e.message}`);
    }
  }

  function auth(r) {
    return { Authorization: `Bearer ${r.key}` };
  }

  /// A problem document (RFC 9457) or any other error body, as one line.
  async function problemText(resp) {
    let text = '';
    try {
      text = await resp.text();
    } catch (e) {
      // the status alone then
    }
    try {
      const p = JSON.parse(text);
      if (p && (p.title || p.detail)) return `${resp.status} ${p.title || ''}: ${p.detail || ''}`;
    } catch (e) {
      // not JSON
    }
    return `${resp.status} ${resp.statusText} ${text.slice(0, 200)}`.trim();
  }

  function timeoutSignal(ms) {
    return AbortSignal.timeout ? AbortSignal.timeout(ms) : undefined;
  }

  function sleep(ms) {
    return new Promise((resolve) => setTimeout(resolve, ms));
  }

  function sleepUntil(t) {
    return sleep(Math.max(0, t - performance.now()));
  }

  function randomHex(bytes) {
    const a = new Uint8Array(bytes);
    crypto.getRandomValues(a);
    return Array.from(a, (b) => b.toString(16).padStart(2, '0')).join('');
  }

  function clampI16(v) {
    return Math.max(-32768, Math.min(32767, Math.round(v)));
  }

  function round1(v) {
    return Math.round(v * 10) / 10;
  }

  function round2(v) {
    return Math.round(v * 100) / 100;
  }

  function last(a) {
    return a[a.length - 1];
  }

  function median(a) {
    const s = a.slice().sort((x, y) => x - y);
    const m = s.length >> 1;
    return s.length % 2 ? s[m] : (s[m - 1] + s[m]) / 2;
  }
})();
