// node dist/examples/infer.js HOST:PORT TOKEN — y = 2x + 1 on [1, 2, 3, 4] through Envoy.
import { gatewayClient, infer } from "../src";

async function main(): Promise<void> {
  const [target, token] = process.argv.slice(2);
  const client = gatewayClient(target, { token });
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
