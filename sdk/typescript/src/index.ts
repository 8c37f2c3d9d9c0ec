// servegrid's TypeScript client: the gateway's generated gRPC client (ts-proto + @grpc/grpc-js,
// from the same protos as every other SDK) plus credentials and a promise-based client whose every
// method takes a partial request (what a call leaves out gets the proto default, via ts-proto's
// fromPartial) and sends the model header the data plane routes on.
import {
  CallOptions,
  ClientReadableStream,
  credentials as grpcCredentials,
  InterceptingCall,
  Interceptor,
  makeGenericClientConstructor,
  Metadata,
  ServiceDefinition,
  ServiceError,
  status,
} from "@grpc/grpc-js";
import {
  AuthServiceClient,
  CancelBatchJobRequest,
  CancelBatchJobResponse,
  CreateAccessTokenResponse,
  CreateBatchJobRequest,
  CreateBatchJobResponse,
  DeepPartial,
  GatewayServiceClient,
  GatewayServiceService,
  GetBatchJobRequest,
  GetBatchJobResponse,
  GetModelRequest,
  GetModelResponse,
  InferRequest,
  InferResponse,
  ListBatchJobResultsRequest,
  ListBatchJobResultsResponse,
  ListBatchJobsRequest,
  ListBatchJobsResponse,
  ListModelsRequest,
  ListModelsResponse,
  RetryBatchJobRequest,
  RetryBatchJobResponse,
  StreamBatchJobResultsRequest,
  StreamBatchJobResultsResponse,
  WatchBatchJobRequest,
  WatchBatchJobResponse,
} from "./gen/servegrid/gateway/v1/gateway";

export * from "./gen/servegrid/gateway/v1/gateway";
export { Tensor, TensorData } from "./gen/servegrid/common/v1/tensor";
// A version's `stage` is the name of one of these values ("STAGE_PRODUCTION"), as every servegrid API
// spells it: compare with `stageToJSON(Stage.STAGE_PRODUCTION)`.
export { Stage, stageFromJSON, stageToJSON } from "./gen/servegrid/registry/v1/registry";

/** The headers Envoy's data plane routes KServe calls on (services/mesh/names.py). */
export const MODEL_HEADER = "x-servegrid-model";
export const VERSION_HEADER = "x-servegrid-model-version";

/** How the caller proves who it is to Envoy: a JWT, or an API key (exchanged for a short-lived
 * token unless `exchangeApiKey` is false). */
export interface Credentials {
  token?: string;
  apiKey?: string;
  exchangeApiKey?: boolean;
  /** TLS: the PEM of a private CA to verify the server with (a local stack's .servegrid/certs/ca.crt). */
  rootCertificates?: Buffer;
  /** TLS with the system's roots when no rootCertificates are given; false: plaintext. Default true. */
  tls?: boolean;
}

/**
 * An API key exchanged once for a short-lived JWT (AuthService.CreateAccessToken) and reused until a
 * little before it expires (a fifth of its lifetime, at most a minute). Envoy verifies the JWT itself,
 * so calls cost no key check each. A server without the exchange (UNIMPLEMENTED) gets the key itself.
 */
export class ApiKeyExchange {
  private token = "";
  private refreshAt = 0;
  private plain = false;
  private pending: Promise<void> | null = null;
  /** How many exchanges this credential made (one for many calls). */
  exchanges = 0;

  constructor(
    private readonly auth: AuthServiceClient,
    private readonly apiKey: string,
    private readonly now: () => number = () => Date.now() / 1000,
  ) {}

  /** The header to send: ["authorization", "Bearer …"], or ["x-api-key", key] without an exchange. */
  async header(): Promise<[string, string]> {
    if (!this.plain && (!this.token || this.now() >= this.refreshAt)) {
      // Concurrent calls share one exchange.
      this.pending ??= this.exchange().finally(() => (this.pending = null));
      await this.pending;
    }
    return this.plain ? ["x-api-key", this.apiKey] : ["authorization", `Bearer ${this.token}`];
  }

  private exchange(): Promise<void> {
    const metadata = new Metadata();
    metadata.set("x-api-key", this.apiKey);
    return new Promise((resolve, reject) => {
      this.auth.createAccessToken({}, metadata, { deadline: Date.now() + 10_000 }, (err, reply) => {
        if (err) {
          if (err.code === status.UNIMPLEMENTED) {
            this.plain = true;
            resolve();
          } else {
            reject(err);
          }
          return;
        }
        this.accept(reply as CreateAccessTokenResponse);
        resolve();
      });
    });
  }

  private accept(reply: CreateAccessTokenResponse): void {
    const now = this.now();
    const expiresAt = reply.expireTime ? reply.expireTime.getTime() / 1000 : now + reply.expiresIn;
    this.token = reply.accessToken;
    this.refreshAt = expiresAt - Math.min(Math.max(expiresAt - now, 0) / 5, 60);
    this.exchanges += 1;
  }
}

/** Adds the credential to every call's metadata (exchanging an API key first where needed). */
function credentialInterceptor(creds: Credentials, exchange: ApiKeyExchange | null): Interceptor {
  return (options, nextCall) =>
    new InterceptingCall(nextCall(options), {
      start(metadata: Metadata, listener, next) {
        if (creds.token) metadata.set("authorization", `Bearer ${creds.token}`);
        if (!exchange) {
          if (creds.apiKey && !creds.token) metadata.set("x-api-key", creds.apiKey);
          next(metadata, listener);
          return;
        }
        exchange.header().then(
          ([key, value]) => {
            metadata.set(key, value);
            next(metadata, listener);
          },
          (err: ServiceError) => {
            // The key was refused: the call fails with the exchange's status (e.g. API_KEY_REVOKED).
            listener.onReceiveStatus?.({ code: err.code, details: err.details, metadata: err.metadata });
          },
        );
      },
    });
}

type Method = keyof typeof GatewayServiceService;

/** What a ts-proto message type offers: fromPartial fills in every field a request leaves out. */
interface MessageType<T> {
  fromPartial(object: DeepPartial<T>): T;
  encode(message: T): { finish(): Uint8Array };
}

/** Each GatewayService method's request type. */
const REQUESTS: { [M in Method]: MessageType<any> } = {
  infer: InferRequest,
  listModels: ListModelsRequest,
  getModel: GetModelRequest,
  createBatchJob: CreateBatchJobRequest,
  getBatchJob: GetBatchJobRequest,
  listBatchJobs: ListBatchJobsRequest,
  cancelBatchJob: CancelBatchJobRequest,
  retryBatchJob: RetryBatchJobRequest,
  watchBatchJob: WatchBatchJobRequest,
  listBatchJobResults: ListBatchJobResultsRequest,
  streamBatchJobResults: StreamBatchJobResultsRequest,
};

/** GatewayService whose requests go through fromPartial before they are encoded: a partial request
 * (`{pageSize: 2}`, or plain JavaScript without every field) encodes with proto defaults for the rest,
 * instead of failing in the encoder on the first field it left out. */
function partialService(): ServiceDefinition {
  const service: Record<string, unknown> = {};
  for (const [name, definition] of Object.entries(GatewayServiceService)) {
    const type = REQUESTS[name as Method];
    service[name] = {
      ...definition,
      requestSerialize: (value: unknown) => Buffer.from(type.encode(type.fromPartial(value as object)).finish()),
    };
  }
  return service as unknown as ServiceDefinition;
}

const PartialGatewayServiceClient = makeGenericClientConstructor(
  partialService(),
  "servegrid.gateway.v1.GatewayService",
) as unknown as typeof GatewayServiceClient;

/** The model headers for a request that names a model (nothing for one that does not). */
export function modelMetadata(request: { modelId?: string; version?: number }, metadata = new Metadata()): Metadata {
  if (request.modelId) {
    metadata.set(MODEL_HEADER, request.modelId);
    if (request.version) metadata.set(VERSION_HEADER, String(request.version));
  }
  return metadata;
}

/** A client for servegrid's public API at `target` (Envoy's host:port): the generated client, whose
 * methods also take partial requests. `ServegridClient` wraps it with promises. */
export function gatewayClient(target: string, creds: Credentials = {}): GatewayServiceClient {
  const channel =
    creds.tls === false && !creds.rootCertificates
      ? grpcCredentials.createInsecure()
      : grpcCredentials.createSsl(creds.rootCertificates ?? null);
  const exchange =
    creds.apiKey && !creds.token && creds.exchangeApiKey !== false
      ? new ApiKeyExchange(new AuthServiceClient(target, channel), creds.apiKey)
      : null;
  return new PartialGatewayServiceClient(target, channel, {
    interceptors: [credentialInterceptor(creds, exchange)],
  });
}

type Callback<R> = (err: ServiceError | null, reply?: R) => void;
type UnaryCall<Q, R> = (
  request: Q,
  metadata: Metadata,
  options: Partial<CallOptions>,
  callback: Callback<R>,
) => unknown;
type StreamCall<Q, R> = (request: Q, metadata: Metadata, options: Partial<CallOptions>) => ClientReadableStream<R>;

function unary<Q extends object, R>(
  client: GatewayServiceClient,
  method: Method,
  request: DeepPartial<Q>,
  deadlineMs: number,
): Promise<R> {
  const full = REQUESTS[method].fromPartial(request) as Q;
  const call = (client[method] as unknown as UnaryCall<Q, R>).bind(client);
  return new Promise((resolve, reject) => {
    call(full, modelMetadata(full), { deadline: Date.now() + deadlineMs }, (err, reply) =>
      err ? reject(err) : resolve(reply!),
    );
  });
}

async function* stream<Q extends object, R>(
  client: GatewayServiceClient,
  method: Method,
  request: DeepPartial<Q>,
  deadlineMs: number,
): AsyncGenerator<R> {
  const full = REQUESTS[method].fromPartial(request) as Q;
  const call = (client[method] as unknown as StreamCall<Q, R>).bind(client);
  const replies = call(full, modelMetadata(full), deadlineMs > 0 ? { deadline: Date.now() + deadlineMs } : {});
  try {
    for await (const reply of replies) yield reply as R;
  } finally {
    replies.cancel(); // a caller that stops reading early ends the stream
  }
}

/** Runs one inference; rejects with the gRPC error (code, details) when the server says no. */
export function infer(
  client: GatewayServiceClient,
  request: DeepPartial<InferRequest>,
  deadlineMs = 30_000,
): Promise<InferResponse> {
  return unary(client, "infer", request, deadlineMs);
}

/**
 * servegrid's public API with promises (and async iterables for streams). Every method takes a partial
 * request: `listModels({ pageSize: 2 })`, `getBatchJob({ jobId })`. Calls that name a model send the
 * model headers; each call gets `deadlineMs` (streams: `streamDeadlineMs`, 0 for none).
 */
export class ServegridClient {
  readonly client: GatewayServiceClient;

  constructor(
    target: string,
    creds: Credentials = {},
    readonly deadlineMs = 30_000,
    readonly streamDeadlineMs = 0,
  ) {
    this.client = gatewayClient(target, creds);
  }

  infer(request: DeepPartial<InferRequest>): Promise<InferResponse> {
    return unary(this.client, "infer", request, this.deadlineMs);
  }

  listModels(request: DeepPartial<ListModelsRequest> = {}): Promise<ListModelsResponse> {
    return unary(this.client, "listModels", request, this.deadlineMs);
  }

  getModel(request: DeepPartial<GetModelRequest>): Promise<GetModelResponse> {
    return unary(this.client, "getModel", request, this.deadlineMs);
  }

  createBatchJob(request: DeepPartial<CreateBatchJobRequest>): Promise<CreateBatchJobResponse> {
    return unary(this.client, "createBatchJob", request, this.deadlineMs);
  }

  getBatchJob(request: DeepPartial<GetBatchJobRequest>): Promise<GetBatchJobResponse> {
    return unary(this.client, "getBatchJob", request, this.deadlineMs);
  }

  listBatchJobs(request: DeepPartial<ListBatchJobsRequest> = {}): Promise<ListBatchJobsResponse> {
    return unary(this.client, "listBatchJobs", request, this.deadlineMs);
  }

  cancelBatchJob(request: DeepPartial<CancelBatchJobRequest>): Promise<CancelBatchJobResponse> {
    return unary(this.client, "cancelBatchJob", request, this.deadlineMs);
  }

  retryBatchJob(request: DeepPartial<RetryBatchJobRequest>): Promise<RetryBatchJobResponse> {
    return unary(this.client, "retryBatchJob", request, this.deadlineMs);
  }

  listBatchJobResults(request: DeepPartial<ListBatchJobResultsRequest>): Promise<ListBatchJobResultsResponse> {
    return unary(this.client, "listBatchJobResults", request, this.deadlineMs);
  }

  watchBatchJob(request: DeepPartial<WatchBatchJobRequest>): AsyncGenerator<WatchBatchJobResponse> {
    return stream(this.client, "watchBatchJob", request, this.streamDeadlineMs);
  }

  streamBatchJobResults(
    request: DeepPartial<StreamBatchJobResultsRequest>,
  ): AsyncGenerator<StreamBatchJobResultsResponse> {
    return stream(this.client, "streamBatchJobResults", request, this.streamDeadlineMs);
  }

  /** Every servable model, page after page (`pageSize` per call; 0: the server's default). */
  async *allModels(pageSize = 0): AsyncGenerator<ListModelsResponse["models"][number]> {
    let pageToken = "";
    do {
      const page = await this.listModels({ pageSize, pageToken });
      yield* page.models;
      pageToken = page.nextPageToken;
    } while (pageToken);
  }

  close(): void {
    this.client.close();
  }
}
