// servegrid's TypeScript client: the gateway's generated gRPC client (ts-proto + @grpc/grpc-js,
// from the same protos as every other SDK) plus credentials and a promise-based infer().
import {
  credentials as grpcCredentials,
  InterceptingCall,
  Interceptor,
  Metadata,
  ServiceError,
  status,
} from "@grpc/grpc-js";
import {
  AuthServiceClient,
  CreateAccessTokenResponse,
  DeepPartial,
  GatewayServiceClient,
  InferRequest,
  InferResponse,
} from "./gen/servegrid/gateway/v1/gateway";

export * from "./gen/servegrid/gateway/v1/gateway";
export { Tensor, TensorData } from "./gen/servegrid/common/v1/tensor";

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

/** A client for servegrid's public API at `target` (Envoy's host:port). */
export function gatewayClient(target: string, creds: Credentials = {}): GatewayServiceClient {
  const channel =
    creds.tls === false && !creds.rootCertificates
      ? grpcCredentials.createInsecure()
      : grpcCredentials.createSsl(creds.rootCertificates ?? null);
  const exchange =
    creds.apiKey && !creds.token && creds.exchangeApiKey !== false
      ? new ApiKeyExchange(new AuthServiceClient(target, channel), creds.apiKey)
      : null;
  return new GatewayServiceClient(target, channel, {
    interceptors: [credentialInterceptor(creds, exchange)],
  });
}

/** Runs one inference; rejects with the gRPC error (code, details) when the server says no. */
export function infer(
  client: GatewayServiceClient,
  request: DeepPartial<InferRequest>,
  deadlineMs = 30_000,
): Promise<InferResponse> {
  return new Promise((resolve, reject) => {
    client.infer(
      InferRequest.fromPartial(request),
      new Metadata(),
      { deadline: Date.now() + deadlineMs },
      (err: ServiceError | null, reply?: InferResponse) => (err ? reject(err) : resolve(reply!)),
    );
  });
}
