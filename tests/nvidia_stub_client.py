"""A client on NVIDIA's own generated modules (PyPI: nvidia-audio2face-3d,
nvidia-ace), shaped like its sample apps: a header with face parameters and
blend-shape multipliers, one second of audio per message, end of audio,
then everything the server sends until the call ends. Each second waits for
its frames, so the chunks the model sees are known (the test compares them
with our own client's).

    python tests/nvidia_stub_client.py HOST:PORT clip.raw RATE SEED   (clip: 16-bit mono PCM)
        [--secure-mode disabled|tls|mtls --ca-cert CA.pem --client-cert C.crt --client-key C.key] [--api-key KEY]

The channel is made as NVIDIA's sample clients make theirs: plaintext, or
``grpc.ssl_channel_credentials`` with the root certificate (``tls``) and
the client's certificate and key (``mtls``); a key travels as call
metadata, through ``metadata_call_credentials`` on a secure channel.

Prints JSON: names, frame count, weights, echoed audio bytes, final status.
"""

import argparse
import json
import math
import queue

import grpc
from nvidia_ace.audio_pb2 import AudioHeader
from nvidia_audio2face_3d.audio2face_pb2_grpc import A2FControllerServiceStub
from nvidia_audio2face_3d.messages_pb2 import (
    AudioWithEmotion,
    AudioWithEmotionStream,
    AudioWithEmotionStreamHeader,
    BlendShapeParameters,
    EmotionPostProcessingParameters,
    FaceParameters,
)

FACE = {"upperFaceStrength": 1.0, "lowerFaceStrength": 1.3, "skinStrength": 1.1, "eyelidOpenOffset": 0.06, "lipOpenOffset": -0.03}
MULTIPLIERS = {"JawOpen": 1.0, "MouthFunnel": 1.2, "EyeLookDownLeft": 0.0, "TongueTipUp": 1.0}


def channel_for(args: argparse.Namespace) -> grpc.Channel:
    if args.secure_mode == "disabled":
        return grpc.insecure_channel(args.target)
    read = lambda path: open(path, "rb").read() if path else None  # noqa: E731
    if args.secure_mode == "tls":
        creds = grpc.ssl_channel_credentials(root_certificates=read(args.ca_cert))
    else:
        creds = grpc.ssl_channel_credentials(read(args.ca_cert), read(args.client_key), read(args.client_cert))
    if args.api_key:
        key = args.api_key
        creds = grpc.composite_channel_credentials(
            creds, grpc.metadata_call_credentials(lambda context, callback: callback((("x-api-key", key),), None))
        )
    return grpc.secure_channel(args.target, creds)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("target")
    ap.add_argument("path")
    ap.add_argument("rate", type=int)
    ap.add_argument("seed", type=int)
    ap.add_argument("--secure-mode", choices=("disabled", "tls", "mtls"), default="disabled")
    ap.add_argument("--ca-cert")
    ap.add_argument("--client-cert")
    ap.add_argument("--client-key")
    ap.add_argument("--api-key")
    args = ap.parse_args()
    path, rate, seed = args.path, args.rate, args.seed
    pcm = open(path, "rb").read()
    outbox: queue.Queue = queue.Queue()
    outbox.put(
        AudioWithEmotionStream(
            audio_stream_header=AudioWithEmotionStreamHeader(
                audio_header=AudioHeader(
                    samples_per_second=rate, bits_per_sample=16, channel_count=1, audio_format=AudioHeader.AUDIO_FORMAT_PCM
                ),
                face_params=FaceParameters(float_params=FACE, integer_params={"seed": seed}),
                emotion_post_processing_params=EmotionPostProcessingParameters(emotion_strength=0.6, max_emotions=3),
                blendshape_params=BlendShapeParameters(bs_weight_multipliers=MULTIPLIERS),
            )
        )
    )
    names, weights, echoed, status = [], [], 0, None
    # A key on a plaintext channel goes with the call (call credentials need TLS).
    metadata = (("x-api-key", args.api_key),) if args.api_key and args.secure_mode == "disabled" else None
    with channel_for(args) as channel:
        answers = A2FControllerServiceStub(channel).ProcessAudioStream(iter(outbox.get, None), timeout=60, metadata=metadata)

        def take(message) -> str:
            nonlocal names, echoed, status
            part = message.WhichOneof("stream_part")
            if part == "animation_data_stream_header":
                names = list(message.animation_data_stream_header.skel_animation_header.blend_shapes)
            elif part == "animation_data":
                weights.extend(list(w.values) for w in message.animation_data.skel_animation.blend_shape_weights)
                echoed += len(message.animation_data.audio.audio_buffer)
            elif part == "status":
                status = message.status
            return part

        take(next(answers))
        for at in range(0, len(pcm), 2 * rate):
            outbox.put(AudioWithEmotionStream(audio_with_emotion=AudioWithEmotion(audio_buffer=pcm[at : at + 2 * rate])))
            # One animation_data message per frame, as Audio2Face-3D sends them: wait for this audio's frames.
            sent_s = min(at + 2 * rate, len(pcm)) / 2 / rate  # (pcm is bytes of 16-bit samples)
            while len(weights) < math.ceil(sent_s * 30 - 1e-9):
                take(next(answers))
        outbox.put(AudioWithEmotionStream(end_of_audio=AudioWithEmotionStream.EndOfAudio()))
        outbox.put(None)
        for message in answers:
            take(message)
    print(json.dumps({
        "names": names, "frames": len(weights), "weights": weights, "echoed_bytes": echoed,
        "status": status.Code.Name(status.code), "status_message": status.message,
        "face_params": FACE, "multipliers": MULTIPLIERS,
    }))  # fmt: skip


if __name__ == "__main__":
    main()
