// node dist/examples/infer.js HOST:PORT TOKEN [CA_FILE] — y = 2x + 1 on [1, 2, 3, 4] through Envoy, over
// TLS verified with CA_FILE (a local stack's .servegrid/certs/ca.crt; SERVEGRID_CA_FILE too), or the
// system's roots without one; SERVEGRID_PLAINTEXT=1 for a stack serving plain HTTP.
import { readFileSync } from "node:fs";
import { gatewayClient, infer } from "../src";

async function main(): Promise<void> {
  const [target, token, caArg] = process.argv.slice(2);
  const caFile = caArg ?? process.env.SERVEGRID_CA_FILE;
  const client = gatewayClient(target, {
    token,
    rootCertificates: caFile ? readFileSync(caFile) : undefined,
    tls: process.env.SERVEGRID_PLAINTEXT !== "1",
  });
  try {
    const reply = await infer(client, {
      modelId: "affine",
      inputs: [{ name: "x", datatype: "FP32", shape: [1, 4], data: { fp32: [1, 2, 3, 4] } }],
    });
    console.log(JSON.stringify({ model: reply.modelId, version: reply.version, y: reply.outputs[0].data?.fp32 }));
  } finally {
    client.close();
  }
}

main().catch((err: Error) => {
  console.error(err.message);
  process.exit(1);
});
