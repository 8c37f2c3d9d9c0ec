{{/* Names and labels shared by every template. */}}
{{- define "servegrid.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "servegrid.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "servegrid.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
app.kubernetes.io/name: {{ include "servegrid.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "servegrid.selector" -}}
app.kubernetes.io/name: {{ include "servegrid.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "servegrid.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{- define "servegrid.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "servegrid.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "servegrid.secretName" -}}
{{- printf "%s-connections" (include "servegrid.fullname" .) -}}
{{- end -}}

{{- /* Where the Envoy pod mounts each Secret and ConfigMap; the renderer's flags name these paths. */}}
{{- define "servegrid.envoyPaths" -}}
config: /etc/envoy
userConfig: /etc/servegrid/envoy-config
idpJwks: /etc/servegrid/idp-jwks
tokenJwks: /etc/servegrid/token-jwks
mtls: /etc/servegrid/mtls
publicTls: /etc/servegrid/public-tls
{{- end -}}

{{- /* The config renderer's flags (python -m services.mesh.bootstrap), as a YAML list: the release's
Service names and ports and every value that changes Envoy's config. envoy.extraArgs go last, so they
win over the chart's. */}}
{{- define "servegrid.envoyRenderArgs" -}}
{{- $fullname := include "servegrid.fullname" . -}}
{{- $paths := fromYaml (include "servegrid.envoyPaths" .) -}}
{{- $svc := .Values.services -}}
{{- $jwt := .Values.jwt -}}
{{- $args := list "--profile" "kubernetes"
  "--listen-port" "8080" "--mesh-port" (toString .Values.envoy.meshPort) "--stats-port" "9901"
  "--gateway" (printf "%s-gateway:%v" $fullname $svc.gateway.port)
  "--router" (printf "%s-router:%v" $fullname $svc.router.port)
  "--registry" (printf "%s-registry:%v" $fullname $svc.registry.port)
  "--edge" (printf "%s-edge:%v" $fullname $svc.edge.port)
  "--audience" $jwt.audience
  "--jwt-max-lifetime-s" (toString $jwt.maxLifetimeSeconds)
  "--ratelimit-window-s" (toString (get (dict "second" 1 "minute" 60 "hour" 3600 "day" 86400) .Values.rateLimit.unit))
-}}
{{- if and $jwt.jwksUri $jwt.jwks }}
{{- fail "jwt: set jwksUri or jwks, not both" }}
{{- end }}
{{- if and (or $jwt.jwksUri $jwt.jwks) (not $jwt.issuer) }}
{{- fail "jwt.issuer is empty: set the `iss` of your identity provider's tokens along with its JWKS" }}
{{- end }}
{{- if and $jwt.issuer (not (or $jwt.jwksUri $jwt.jwks)) }}
{{- fail "jwt.issuer is set but no JWKS: set jwt.jwksUri (the IdP's JWKS endpoint) or jwt.jwks (the JWKS itself)" }}
{{- end }}
{{- with $jwt.issuer }}{{- $args = concat $args (list "--issuer" .) }}{{- end }}
{{- with $jwt.jwksUri }}{{- $args = concat $args (list "--jwks-uri" .) }}{{- end }}
{{- if $jwt.jwks }}{{- $args = concat $args (list "--jwks-file" (printf "%s/jwks.json" $paths.idpJwks)) }}{{- end }}
{{- if .Values.tokens.existingSecret }}
{{- $args = concat $args (list "--token-jwks-file" (printf "%s/jwks.json" $paths.tokenJwks) "--token-issuer" .Values.tokens.issuer) }}
{{- end }}
{{- if .Values.rateLimit.failClosed }}{{- $args = append $args "--ratelimit-fail-closed" }}{{- end }}
{{- if .Values.tls.existingSecret }}
{{- $args = concat $args (list "--tls-cert-file" (printf "%s/envoy.crt" $paths.mtls) "--tls-key-file" (printf "%s/envoy.key" $paths.mtls) "--tls-ca-file" (printf "%s/ca.crt" $paths.mtls)) }}
{{- end }}
{{- if .Values.publicTls.existingSecret }}
{{- $args = concat $args (list "--public-tls-cert" (printf "%s/tls.crt" $paths.publicTls) "--public-tls-key" (printf "%s/tls.key" $paths.publicTls)) }}
{{- end }}
{{- with .Values.otlpEndpoint }}{{- $args = concat $args (list "--otlp-endpoint" (urlParse .).host) }}{{- end }}
{{- /* The descriptor set: written beside the config, and read from there. */}}
{{- $descriptors := printf "%s/descriptors.binpb" $paths.config }}
{{- $args = concat $args .Values.envoy.extraArgs (list "--descriptor-file" $descriptors "--out" (printf "%s/envoy.yaml" $paths.config) "--descriptor-set-out" $descriptors) }}
{{- toYaml $args }}
{{- end -}}

{{- /* A PodDisruptionBudget for a workload running more than one replica (one with a single replica
would block every node drain). Takes root, component and replicas. */}}
{{- define "servegrid.pdb" -}}
{{- if and .root.Values.podDisruptionBudget.enabled (gt (int .replicas) 1) }}
---
apiVersion: policy/v1
kind: PodDisruptionBudget
metadata:
  name: {{ include "servegrid.fullname" .root }}-{{ .component }}
  labels:
    {{- include "servegrid.labels" .root | nindent 4 }}
    app.kubernetes.io/component: {{ .component }}
spec:
  minAvailable: {{ .root.Values.podDisruptionBudget.minAvailable }}
  selector:
    matchLabels:
      {{- include "servegrid.selector" . | nindent 6 }}
{{- end }}
{{- end -}}
