// node dist/examples/models.js HOST:PORT TOKEN [CA_FILE] — the servable models, two per page, through Envoy:
// prints one JSON line per page ({"models": [...ids], "stages": [...], "next": token}). TLS as examples/infer.ts.
import { readFileSync } from "node:fs";
import { ServegridClient } from "../src";

async function main(): Promise<void> {
  const [target, token, caArg] = process.argv.slice(2);
  const caFile = caArg ?? process.env.SERVEGRID_CA_FILE;
  const client = new ServegridClient(target, {
    token,
    rootCertificates: caFile ? readFileSync(caFile) : undefined,
    tls: process.env.SERVEGRID_PLAINTEXT !== "1",
  });
  try {
    let pageToken = "";
    do {
      const page = await client.listModels({ pageSize: 2, pageToken });
      const stages = page.models.map((m) => m.versions.map((v) => v.stage));
      console.log(JSON.stringify({ models: page.models.map((m) => m.modelId), stages, next: page.nextPageToken }));
      pageToken = page.nextPageToken;
    } while (pageToken);
  } finally {
    client.close();
  }
}

main().catch((err: Error) => {
  console.error(err.message);
  process.exit(1);
});
