// The client against an in-process GatewayService (grpc-js, the strict generated definition, so the
// bytes on the wire are what a real gateway decodes): partial requests, paging, model headers, streams.
// Run with `npm test` (tsc, then node's own test runner).
import assert from "node:assert/strict";
import { after, before, test } from "node:test";
import { Metadata, Server, ServerCredentials, ServerUnaryCall, ServerWritableStream, status } from "@grpc/grpc-js";
import {
  GatewayServiceService,
  gatewayClient,
  GetModelRequest,
  GetModelResponse,
  InferRequest,
  InferResponse,
  ListModelsRequest,
  ListModelsResponse,
  MODEL_HEADER,
  ServegridClient,
  Stage,
  stageToJSON,
  VERSION_HEADER,
  WatchBatchJobRequest,
  WatchBatchJobResponse,
} from "../src";

const MODELS = ["affine", "digits", "resnet18"];
const seen: { method: string; request: unknown; metadata: Metadata }[] = [];
let server: Server;
let target = "";

function record(method: string, call: ServerUnaryCall<unknown, unknown> | ServerWritableStream<unknown, unknown>) {
  seen.push({ method, request: call.request, metadata: call.metadata });
}

function unimplemented(_call: unknown, callback: (err: { code: number; details: string }) => void): void {
  callback({ code: status.UNIMPLEMENTED, details: "not in this fake" });
}

// The fake's replies go through fromPartial too: the generated encoder needs every field set.
before(async () => {
  server = new Server();
  server.addService(GatewayServiceService, {
    listModels: (call: ServerUnaryCall<ListModelsRequest, unknown>, callback: (e: null, r: unknown) => void) => {
      record("listModels", call);
      const start = Number(call.request.pageToken || 0);
      const size = call.request.pageSize || 50;
      const page = MODELS.slice(start, start + size);
      const next = start + size < MODELS.length ? String(start + size) : "";
      const models = page.map((modelId) => ({
        name: `models/${modelId}`,
        modelId,
        versions: [{ version: 1, stage: stageToJSON(Stage.STAGE_PRODUCTION), trafficPercent: 100 }],
      }));
      callback(null, ListModelsResponse.fromPartial({ models, nextPageToken: next }));
    },
    getModel: (call: ServerUnaryCall<GetModelRequest, unknown>, callback: (e: null, r: unknown) => void) => {
      record("getModel", call);
      callback(null, GetModelResponse.fromPartial({ model: { modelId: call.request.modelId } }));
    },
    infer: (call: ServerUnaryCall<InferRequest, unknown>, callback: (e: null, r: unknown) => void) => {
      record("infer", call);
      const { modelId, inputs } = call.request;
      callback(null, InferResponse.fromPartial({ modelId, version: 1, outputs: inputs }));
    },
    watchBatchJob: (call: ServerWritableStream<WatchBatchJobRequest, unknown>) => {
      record("watchBatchJob", call);
      for (const rate of [1, 2]) {
        const progress = { job: { jobId: call.request.jobId }, itemsPerSecond: rate };
        call.write(WatchBatchJobResponse.fromPartial({ progress }));
      }
      call.end();
    },
    createBatchJob: unimplemented,
    getBatchJob: unimplemented,
    listBatchJobs: unimplemented,
    cancelBatchJob: unimplemented,
    retryBatchJob: unimplemented,
    listBatchJobResults: unimplemented,
    streamBatchJobResults: unimplemented,
  });
  const port = await new Promise<number>((resolve, reject) =>
    server.bindAsync("127.0.0.1:0", ServerCredentials.createInsecure(), (err, bound) =>
      err ? reject(err) : resolve(bound),
    ),
  );
  target = `127.0.0.1:${port}`;
});

after(() => server.forceShutdown());

function client(): ServegridClient {
  return new ServegridClient(target, { token: "t", tls: false }, 5_000);
}

test("listModels takes a partial request and pages with the tokens it returns", async () => {
  const sdk = client();
  try {
    const first = await sdk.listModels({ pageSize: 2 });
    assert.deepEqual(
      first.models.map((m) => m.modelId),
      ["affine", "digits"],
    );
    assert.equal(first.nextPageToken, "2");
    const rest = await sdk.listModels({ pageSize: 2, pageToken: first.nextPageToken });
    assert.deepEqual(
      rest.models.map((m) => m.modelId),
      ["resnet18"],
    );
    assert.equal(rest.nextPageToken, "");
    const everything = [];
    for await (const model of sdk.allModels(2)) everything.push(model.modelId);
    assert.deepEqual(everything, MODELS);
    // The defaults were filled in, not left undefined: the server decoded an empty page token.
    assert.deepEqual(seen.find((s) => s.method === "listModels")?.request, { pageSize: 2, pageToken: "" });
    assert.deepEqual(await sdk.listModels(), { models: first.models.concat(rest.models), nextPageToken: "" });
  } finally {
    sdk.close();
  }
});

test("a version's stage reads as the registry spells it", async () => {
  const sdk = client();
  try {
    const { models } = await sdk.listModels({});
    assert.equal(models[0].versions[0].stage, "STAGE_PRODUCTION");
  } finally {
    sdk.close();
  }
});

test("calls that name a model send the model headers; the credential travels too", async () => {
  const sdk = client();
  try {
    const reply = await sdk.infer({
      modelId: "affine",
      version: 3,
      inputs: [{ name: "x", datatype: "FP32", shape: [1, 2], data: { fp32: [1, 2] } }],
    });
    assert.deepEqual(reply.outputs[0].data?.fp32, [1, 2]);
    const inferred = seen.filter((s) => s.method === "infer").at(-1)!;
    assert.deepEqual(inferred.metadata.get(MODEL_HEADER), ["affine"]);
    assert.deepEqual(inferred.metadata.get(VERSION_HEADER), ["3"]);
    assert.deepEqual(inferred.metadata.get("authorization"), ["Bearer t"]);

    await sdk.getModel({ modelId: "digits" });
    const got = seen.filter((s) => s.method === "getModel").at(-1)!;
    assert.deepEqual(got.metadata.get(MODEL_HEADER), ["digits"]);
    assert.deepEqual(got.metadata.get(VERSION_HEADER), []); // no version named: none sent

    await sdk.listModels({ pageSize: 1 });
    assert.deepEqual(seen.filter((s) => s.method === "listModels").at(-1)!.metadata.get(MODEL_HEADER), []);
  } finally {
    sdk.close();
  }
});

test("streams take partial requests and come out as async iterables", async () => {
  const sdk = client();
  try {
    const rates = [];
    for await (const update of sdk.watchBatchJob({ jobId: "j-1" })) rates.push(update.progress?.itemsPerSecond);
    assert.deepEqual(rates, [1, 2]);
  } finally {
    sdk.close();
  }
});

test("the generated client itself takes a partial request too (plain JavaScript callers)", async () => {
  const raw = gatewayClient(target, { tls: false });
  try {
    const reply = await new Promise<{ models: unknown[] }>((resolve, reject) =>
      // Only what a JavaScript caller would write: the encoder used to fail on the missing page token.
      (raw.listModels as unknown as (r: object, cb: (e: Error | null, r: { models: unknown[] }) => void) => void)(
        { pageSize: 1 },
        (err, r) => (err ? reject(err) : resolve(r)),
      ),
    );
    assert.equal(reply.models.length, 1);
  } finally {
    raw.close();
  }
});

test("errors reject with the gRPC status", async () => {
  const sdk = client();
  try {
    await assert.rejects(sdk.getBatchJob({ jobId: "j" }), (err: { code: number }) => err.code === status.UNIMPLEMENTED);
  } finally {
    sdk.close();
  }
});
