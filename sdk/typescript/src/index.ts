// servegrid's TypeScript client: the gateway's generated gRPC client (ts-proto + @grpc/grpc-js,
// from the same protos as every other SDK) plus credentials and a promise-based infer().
import {
  credentials as grpcCredentials,
  InterceptingCall,
  Interceptor,
  Metadata,
  ServiceError,
} from "@grpc/grpc-js";
import { DeepPartial, GatewayServiceClient, InferRequest, InferResponse } from "./gen/servegrid/gateway/v1/gateway";

export * from "./gen/servegrid/gateway/v1/gateway";
export { Tensor, TensorData } from "./gen/servegrid/common/v1/tensor";

/** How the caller proves who it is to Envoy: a JWT, or an API key. */
export interface Credentials {
  token?: string;
  apiKey?: string;
}

/** Adds the credential to every call's metadata. */
function credentialInterceptor(creds: Credentials): Interceptor {
  return (options, nextCall) =>
    new InterceptingCall(nextCall(options), {
      start(metadata: Metadata, listener, next) {
        if (creds.token) metadata.set("authorization", `Bearer ${creds.token}`);
        if (creds.apiKey) metadata.set("x-api-key", creds.apiKey);
        next(metadata, listener);
      },
    });
}

/** A client for servegrid's public API at `target` (Envoy's host:port). */
export function gatewayClient(target: string, creds: Credentials = {}): GatewayServiceClient {
  return new GatewayServiceClient(target, grpcCredentials.createInsecure(), {
    interceptors: [credentialInterceptor(creds)],
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
