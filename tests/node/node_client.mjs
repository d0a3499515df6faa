// A Node.js producer written against runledger's documented HTTP contract (docs/http.md) with libraries nobody in
// runledger wrote: the CloudEvents JavaScript SDK builds each request (structured and binary mode) and the
// Standard Webhooks package signs it. tests/integration/httpapi/test_node_client.py runs it against a real
// `runledger serve` and checks that what it appended is in the log and projected exactly.
//
// Settings (environment): RUNLEDGER_URL, RUNLEDGER_SOURCE_ID, RUNLEDGER_SOURCE (the source's CloudEvents source),
// RUNLEDGER_SECRET (its whsec_ secret), RUNLEDGER_STREAM (appended with CloudEvents) and RUNLEDGER_SIMPLE_STREAM
// (appended with the simple body). Prints one JSON object: every CloudEvent sent and every answer.
import { randomUUID } from "node:crypto";

import { CloudEvent, HTTP } from "cloudevents";
import { Webhook } from "standardwebhooks";

const env = (name) => {
  const value = process.env[name];
  if (!value) throw new Error(`${name} is not set`);
  return value;
};
const url = env("RUNLEDGER_URL");
const sourceId = env("RUNLEDGER_SOURCE_ID");
const source = env("RUNLEDGER_SOURCE");
const stream = env("RUNLEDGER_STREAM");
const simpleStream = env("RUNLEDGER_SIMPLE_STREAM");
const webhook = new Webhook(env("RUNLEDGER_SECRET"));

// POST `body` (a string) to `path`, signed per Standard Webhooks; `msgId` is the request's idempotency key.
async function post(path, headers, body, msgId = `msg_${randomUUID()}`) {
  const now = new Date();
  const response = await fetch(url + path, {
    method: "POST",
    body,
    headers: {
      ...headers,
      "runledger-source": sourceId,
      "webhook-id": msgId,
      "webhook-timestamp": String(Math.floor(now.getTime() / 1000)),
      "webhook-signature": webhook.sign(msgId, now, body),
    },
  });
  const text = await response.text();
  return {
    status: response.status,
    content_type: response.headers.get("content-type"),
    body: text ? JSON.parse(text) : null,
    msg_id: msgId,
  };
}

const base = Date.now() - 60_000;
const at = (s) => new Date(base + s * 1000).toISOString();
const steps = [
  ["structured", "execution.started", { workflow: "invoice-triage", agent_id: "agent-node", customer_id: "acme",
                                        input: { doc: "inv-17.pdf" }, budget_usd: "2.50" }],
  ["binary", "step.started", { step_id: "s1", name: "extract", order: 1, input: {} }],
  ["structured", "cost.incurred", { step_id: "s1", provider: "openai", model: "gpt-4o", input_tokens: 1200,
                                    output_tokens: 300, cached_tokens: 0, cost_usd: "0.006000" }],
  ["binary", "step.completed", { step_id: "s1", output: { total: "1240.00", currency: "EUR" } }],
  ["structured", "step.started", { step_id: "s2", name: "review", order: 2, input: {} }],
  ["binary", "cost.incurred", { step_id: "s2", provider: "anthropic", model: "claude-3-5-sonnet-20241022",
                                input_tokens: 800, output_tokens: 120, cost_usd: "0.004200" }],
  ["structured", "artifact.created", { artifact_id: "art-1", step_id: "s2", type: "report", name: "summary.pdf",
                                       uri: "s3://runs/node/summary.pdf", size_bytes: 48213,
                                       content_type: "application/pdf" }],
  ["binary", "step.completed", { step_id: "s2", output: { ok: true } }],
  ["structured", "execution.completed", { output: { approved: true, score: 0.93 } }],
];

const sent = [];
const answers = [];
for (const [n, [mode, type, data]] of steps.entries()) {
  const event = new CloudEvent({ type, source, subject: stream, time: at(n), datacontenttype: "application/json",
                                 data });
  const message = mode === "structured" ? HTTP.structured(event) : HTTP.binary(event);
  const last = n === steps.length - 1;
  const answer = await post(last ? "/v1/events?wait=projected&timeout=30" : "/v1/events", message.headers,
                            message.body);
  sent.push({ mode, event: event.toJSON(), headers: message.headers, body: message.body });
  answers.push({ mode, ...answer });
}

// A retried request (the same webhook-id, signed again): the same ids, seqs and hashes, nothing appended twice.
const again = sent[2];
const replayed = await post("/v1/events", again.headers, again.body, answers[2].msg_id);

// The simple body: an array of {type, data, time?, idempotency_key?} to a stream's own route.
const simple = await post(`/v1/streams/${encodeURIComponent(simpleStream)}/events`,
                          { "content-type": "application/json" }, JSON.stringify([
  { type: "execution.started", data: { workflow: "refund", customer_id: "acme" }, time: at(0) },
  { type: "step.started", data: { step_id: "s1", name: "lookup" }, time: at(1) },
  { type: "step.completed", data: { step_id: "s1", output: {} }, time: at(2) },
  { type: "execution.completed", data: { output: {} }, time: at(3), idempotency_key: "refund-done" },
]));

process.stdout.write(JSON.stringify({ sent, answers, replayed, simple }) + "\n");
