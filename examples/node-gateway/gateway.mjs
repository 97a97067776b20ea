#!/usr/bin/env node
// A gatefleet gateway agent in Node.js, written from docs/PROTOCOL.md (section 1) and the
// JSON Schemas in docs/schemas: heartbeat, ping -> pong, config-push -> config-ack, goodbye.
//
//   node gateway.mjs --id edge-js-1 --region us-west [--nats nats://127.0.0.1:4222]
//
// It heartbeats on P.gw.<id>.heartbeat, answers P.gw.<id>.ping and P.gw.<id>.config, and
// says goodbye on P.gw.<id>.goodbye when it gets SIGINT or SIGTERM. A config push is
// "applied" by keeping its version (reported in the next heartbeat's config_versions);
// pushes of a type given with --reject are rejected (a NACK), to show what one looks like.
// A push of a version lower than the one held for its type is never applied: it gets a
// NACK with error "stale_version" and held_version (gatefleet then pushes above it).
// Fencing: a push whose epoch is lower than the highest seen (of any type) came from a
// gatefleet leader that another replica has replaced: it gets a NACK with error
// "stale_epoch" and held_epoch, before anything else. A push without epoch is not fenced.

import os from "node:os";
import { parseArgs } from "node:util";
import { connect, JSONCodec } from "nats";

const ID_PATTERN = /^[A-Za-z0-9_-]{1,64}$/; // a gateway id, as in heartbeat.json
const CONFIG_TYPE_PATTERN = /^[A-Za-z0-9_]{1,64}$/;
const DISTRIBUTION_ID_PATTERN = /^dist-[A-Za-z0-9-]{1,64}$/;
const MAX_COUNT = 2 ** 53;
const MAX_ERROR_CHARS = 4096; // config-ack.json: error's maxLength
const REMEMBERED_PUSHES = 1000; // results kept to answer a repeated push the same way
const STALE_VERSION = "stale_version"; // config-ack.json: error of a version below the one held
const STALE_EPOCH = "stale_epoch"; // config-ack.json: error of an epoch below the highest seen

const USAGE = `usage: node gateway.mjs --id ID --region REGION [options]
  --nats URL             NATS server (default: $NATS_URL or nats://127.0.0.1:4222)
  --prefix P             subject prefix (default: gatefleet)
  --interval-ms N        heartbeat interval (default: 1000)
  --role primary|backup  and --backup-for ID: this gateway's place in a pair
  --max-connections N    capacity reported in heartbeats (default: 1000)
  --label KEY=VALUE      a label (repeatable)
  --reject TYPE          reject (NACK) pushes of this config type (repeatable)`;

function fail(message) {
  console.error(`gateway: ${message}\n${USAGE}`);
  process.exit(2);
}

function options() {
  let values;
  try {
    ({ values } = parseArgs({
      options: {
        nats: { type: "string", default: process.env.NATS_URL ?? "nats://127.0.0.1:4222" },
        id: { type: "string" },
        region: { type: "string" },
        prefix: { type: "string", default: "gatefleet" },
        "interval-ms": { type: "string", default: "1000" },
        role: { type: "string" },
        "backup-for": { type: "string" },
        "max-connections": { type: "string", default: "1000" },
        label: { type: "string", multiple: true, default: [] },
        reject: { type: "string", multiple: true, default: [] },
        help: { type: "boolean", short: "h" },
      },
    }));
  } catch (err) {
    fail(err.message);
  }
  if (values.help) {
    console.log(USAGE);
    process.exit(0);
  }
  if (!ID_PATTERN.test(values.id ?? "")) fail("--id needs 1-64 of [A-Za-z0-9_-]");
  if (!values.region || values.region.length > 64) fail("--region needs 1-64 characters");
  const interval = Number(values["interval-ms"]);
  if (!(interval > 0)) fail("--interval-ms must be a positive number");
  const capacity = Number(values["max-connections"]);
  if (!Number.isInteger(capacity) || capacity < 1) fail("--max-connections must be >= 1");
  if (values.role && !["primary", "backup"].includes(values.role)) fail("--role: primary or backup");
  if (values["backup-for"] && !ID_PATTERN.test(values["backup-for"])) fail("--backup-for: a gateway id");
  const labels = {};
  for (const label of values.label) {
    const at = label.indexOf("=");
    if (at < 1) fail(`--label ${label}: KEY=VALUE`);
    labels[label.slice(0, at)] = label.slice(at + 1);
  }
  return { ...values, interval, capacity, labels, reject: new Set(values.reject) };
}

// This process's share of the machine's CPU since the last call, in percent (a real
// gateway reports its own load here).
let lastCpu = { usage: process.cpuUsage(), at: process.hrtime.bigint() };
function cpuPercent() {
  const usage = process.cpuUsage();
  const at = process.hrtime.bigint();
  const usedUs = usage.user - lastCpu.usage.user + usage.system - lastCpu.usage.system;
  const elapsedUs = Number(at - lastCpu.at) / 1000;
  lastCpu = { usage, at };
  const share = (100 * usedUs) / Math.max(elapsedUs * os.cpus().length, 1);
  return Math.min(Math.max(share, 0), 100);
}

function memoryPercent() {
  return Math.min(Math.max(100 * (1 - os.freemem() / os.totalmem()), 0), 100);
}

// A ConfigPush as config-push.json describes it, or the reason it is not one.
function checkPush(push) {
  if (typeof push !== "object" || push === null || Array.isArray(push)) return "not an object";
  if (!DISTRIBUTION_ID_PATTERN.test(push.distribution_id ?? "")) return "bad distribution_id";
  if (!CONFIG_TYPE_PATTERN.test(push.config_type ?? "")) return "bad config_type";
  const { version, attempt = 1 } = push;
  if (!Number.isInteger(version) || version < 1 || version > MAX_COUNT) return "bad version";
  if (!Number.isInteger(attempt) || attempt < 1) return "bad attempt";
  const { epoch = null } = push;
  if (epoch !== null && (!Number.isInteger(epoch) || epoch < 1 || epoch > MAX_COUNT)) {
    return "bad epoch";
  }
  const data = push.config_data;
  if (typeof data !== "object" || data === null || Array.isArray(data)) return "bad config_data";
  return null;
}

async function main() {
  const opts = options();
  const subject = (verb) => `${opts.prefix}.gw.${opts.id}.${verb}`;
  const json = JSONCodec();
  const configVersions = {}; // config type -> version applied
  const results = new Map(); // "distribution_id@version" -> {ok, error}, oldest first
  let highestEpoch = 0; // of the pushes seen; 0: none carried one
  let seq = 0;

  // Once connected, reconnect forever: gatefleet marks a silent gateway down, not gone.
  const nc = await connect({
    servers: opts.nats,
    name: `node-gateway-${opts.id}`,
    maxReconnectAttempts: -1,
  });
  console.error(`gateway ${opts.id}: connected to ${nc.getServer()}`);

  nc.subscribe(subject("ping"), {
    callback: (err, msg) => {
      if (!err) msg.respond(json.encode({ gateway_id: opts.id }));
    },
  });

  nc.subscribe(subject("config"), {
    callback: (err, msg) => {
      if (err) return;
      let push;
      try {
        push = json.decode(msg.data);
      } catch {
        push = undefined;
      }
      const problem = checkPush(push);
      if (problem) {
        console.error(`gateway ${opts.id}: ignored a config push (${problem})`);
        return; // like any malformed message: dropped, no answer
      }
      const epoch = push.epoch ?? null;
      let result;
      if (epoch !== null && epoch < highestEpoch) {
        // From a replaced leader: nothing of it, not even the answer to a repeat.
        const pushed = `${push.config_type} v${push.version}`;
        console.error(`gateway ${opts.id}: refused ${pushed}: epoch ${epoch} < ${highestEpoch}`);
        result = { ok: false, error: STALE_EPOCH, held_epoch: highestEpoch };
      } else {
        if (epoch !== null) highestEpoch = epoch;
        result = answer(push);
      }
      msg.respond(
        json.encode({
          distribution_id: push.distribution_id,
          gateway_id: opts.id,
          ok: result.ok,
          version: push.version,
          error: result.error,
          held_version: result.held_version ?? null,
          held_epoch: result.held_epoch ?? null,
        }),
      );
    },
  });

  function answer(push) {
    const key = `${push.distribution_id}@${push.version}`;
    const known = results.get(key); // a repeat is acked again, as it was the first time
    if (known) return known;
    const held = configVersions[push.config_type] ?? 0;
    if (push.version < held) {
      // Not remembered: what is held only grows.
      const pushed = `${push.config_type} v${push.version}`;
      console.error(`gateway ${opts.id}: refused ${pushed}: v${held} is held`);
      return { ok: false, error: STALE_VERSION, held_version: held };
    }
    const result = apply(push);
    results.set(key, result);
    if (results.size > REMEMBERED_PUSHES) results.delete(results.keys().next().value);
    return result;
  }

  function apply(push) {
    if (opts.reject.has(push.config_type)) {
      const error = `config type ${push.config_type} is not accepted here`.slice(0, MAX_ERROR_CHARS);
      console.error(`gateway ${opts.id}: rejected ${push.config_type} v${push.version}`);
      return { ok: false, error };
    }
    configVersions[push.config_type] = push.version;
    console.error(`gateway ${opts.id}: applied ${push.config_type} v${push.version}`);
    return { ok: true, error: null };
  }

  function heartbeat() {
    seq += 1;
    const beat = {
      gateway_id: opts.id,
      region: opts.region,
      seq,
      ts: new Date().toISOString(),
      cpu_percent: cpuPercent(),
      memory_percent: memoryPercent(),
      active_connections: 0,
      max_connections: opts.capacity,
      config_versions: configVersions,
      labels: opts.labels,
    };
    if (opts.role) beat.role = opts.role;
    if (opts["backup-for"]) beat.backup_for = opts["backup-for"];
    nc.publish(subject("heartbeat"), json.encode(beat));
  }

  // The subscriptions are in place before the first heartbeat makes this gateway known.
  await nc.flush();
  heartbeat();
  const timer = setInterval(heartbeat, opts.interval);
  console.error(`gateway ${opts.id}: beating every ${opts.interval} ms`);

  let stopping = false;
  async function stop(signal) {
    if (stopping) return;
    stopping = true;
    clearInterval(timer);
    nc.publish(subject("goodbye"), json.encode({ gateway_id: opts.id }));
    await nc.drain(); // delivers the goodbye, then closes
    console.error(`gateway ${opts.id}: said goodbye (${signal})`);
  }
  process.on("SIGINT", () => stop("SIGINT"));
  process.on("SIGTERM", () => stop("SIGTERM"));

  const closed = await nc.closed();
  if (closed && !stopping) {
    console.error(`gateway ${opts.id}: connection closed: ${closed.message}`);
    process.exit(1);
  }
}

main().catch((err) => {
  console.error(`gateway: ${err.message ?? err}`);
  process.exit(1);
});
