// A webhook receiver in Node.js, verifying with the npm standardwebhooks package: docs/webhooks.md shows it
// (between the markers), tests/integration/test_webhook_sender.py and test_webhook_deliveries.py run it.
// RUNLEDGER_WEBHOOK_SECRET is the endpoint's whsec_ secret, RECEIVER_PORT the port (default: any free one); it
// prints the port it listens on, then one JSON line per delivery it got.
// --- docs/webhooks.md: receiver ---
import { createServer } from "node:http";
import { Webhook } from "standardwebhooks";

const webhook = new Webhook(process.env.RUNLEDGER_WEBHOOK_SECRET);

const server = createServer((req, res) => {
  const chunks = [];
  req.on("data", (chunk) => chunks.push(chunk));
  req.on("end", () => {
    const body = Buffer.concat(chunks).toString("utf8"); // the stored CloudEvent, byte for byte
    try {
      webhook.verify(body, req.headers); // throws unless a signature matches and the timestamp is recent
    } catch (err) {
      res.writeHead(401).end();
      console.log(JSON.stringify({ verified: false, error: String(err) }));
      return;
    }
    const event = JSON.parse(body);
    // Deliveries are at least once: the same webhook-id may come again; process each id once.
    console.log(JSON.stringify({ verified: true, id: req.headers["webhook-id"], type: event.type }));
    res.writeHead(204).end();
  });
});
// --- end ---
server.listen(Number(process.env.RECEIVER_PORT ?? 0), "127.0.0.1", () => console.log(JSON.stringify({ port: server.address().port })));
