package io.driftline.interop;

import java.io.BufferedReader;
import java.io.InputStreamReader;
import java.io.File;
import java.nio.ByteBuffer;
import java.nio.charset.StandardCharsets;
import java.time.Duration;
import java.util.ArrayList;
import java.util.HashMap;
import java.util.HexFormat;
import java.util.List;
import java.util.Map;
import java.util.Properties;

import org.apache.avro.Schema;
import org.apache.avro.generic.GenericData;
import org.apache.avro.generic.GenericRecord;
import org.apache.avro.message.BinaryMessageDecoder;
import org.apache.avro.message.BinaryMessageEncoder;
import org.apache.kafka.clients.consumer.ConsumerRecord;
import org.apache.kafka.clients.consumer.KafkaConsumer;
import org.apache.kafka.clients.producer.KafkaProducer;
import org.apache.kafka.clients.producer.ProducerRecord;
import org.apache.kafka.common.header.Header;
import org.apache.kafka.common.serialization.ByteArrayDeserializer;
import org.apache.kafka.common.serialization.ByteArraySerializer;
import org.apache.kafka.common.serialization.StringDeserializer;
import org.apache.kafka.common.serialization.StringSerializer;

/**
 * A producer and a consumer that no one at driftline wrote the encoding of: Apache Avro's
 * BinaryMessageEncoder / BinaryMessageDecoder (single-object encoding, as the spec defines it) and
 * the Apache Kafka Java client. Driven by tests/interop/java_ref.py.
 *
 * <pre>
 *   encode EVENT.avsc LABEL.avsc N PREFIX FLIP_AT BASE_TS        -> "E hex" / "L hex" lines
 *   decode SCHEMA.avsc...       ("Name hex" lines on stdin)      -> one record (toString) a line
 *   produce BOOTSTRAP EVENT.avsc LABEL.avsc EVENTS LABELS N PREFIX FLIP_AT BASE_TS
 *   produce-registry BOOTSTRAP REGISTRY_URL EVENT.avsc LABEL.avsc EVENTS LABELS N PREFIX FLIP_AT BASE_TS
 *       (Apicurio's AvroKafkaSerializer in Confluent mode: 00, the 4-byte content id, the body;
 *        each schema registered under TOPIC-value at REGISTRY_URL, Apicurio's own API)
 *   consume BOOTSTRAP TIMEOUT_S GROUP COUNT TOPIC=SCHEMA.avsc... -> "topic TAB record" a line
 *       (at least COUNT records, then until the topics are quiet for a second)
 * </pre>
 *
 * Event i: entity "ent-(i%5)", ts BASE_TS+i, fields x=((37i)%100)/100, y=((11i)%13)/13; its
 * label is "1" when x > 0.5, flipped from event FLIP_AT on (a concept drift).
 */
public final class Interop {

  private Interop() {}

  static Schema schema(String path) throws Exception {
    return new Schema.Parser().parse(new File(path));
  }

  static GenericRecord event(Schema s, String prefix, int i, double baseTs) {
    GenericRecord r = new GenericData.Record(s);
    r.put("event_id", prefix + i);
    r.put("entity_id", "ent-" + (i % 5));
    r.put("ts", baseTs + i);
    Map<String, Double> fields = new HashMap<>();
    fields.put("x", x(i));
    fields.put("y", ((11 * i) % 13) / 13.0);
    r.put("fields", fields);
    // every other field (published_ms, and what later versions add) takes its default
    for (Schema.Field f : s.getFields()) {
      if (r.get(f.name()) == null && f.hasDefaultValue()) {
        r.put(f.name(), GenericData.get().getDefaultValue(f));
      }
    }
    return r;
  }

  static double x(int i) {
    return ((37 * i) % 100) / 100.0;
  }

  static GenericRecord label(Schema s, String prefix, int i, int flipAt, double baseTs) {
    GenericRecord r = new GenericData.Record(s);
    boolean positive = x(i) > 0.5;
    if (i >= flipAt) {
      positive = !positive;
    }
    r.put("event_id", prefix + i);
    r.put("label", positive ? "1" : "0");
    r.put("ts", baseTs + i + 0.5);
    return r;
  }

  static byte[] bytes(ByteBuffer b) {
    byte[] out = new byte[b.remaining()];
    b.get(out);
    return out;
  }

  public static void main(String[] args) throws Exception {
    switch (args[0]) {
      case "encode" -> encode(args);
      case "decode" -> decode(args);
      case "produce" -> produce(args);
      case "produce-registry" -> produceRegistry(args);
      case "consume" -> consume(args);
      default -> throw new IllegalArgumentException("unknown mode " + args[0]);
    }
  }

  static void encode(String[] a) throws Exception {
    Schema es = schema(a[1]);
    Schema ls = schema(a[2]);
    int n = Integer.parseInt(a[3]);
    int flipAt = Integer.parseInt(a[5]);
    double baseTs = Double.parseDouble(a[6]);
    BinaryMessageEncoder<GenericRecord> ee = new BinaryMessageEncoder<>(GenericData.get(), es);
    BinaryMessageEncoder<GenericRecord> le = new BinaryMessageEncoder<>(GenericData.get(), ls);
    HexFormat hex = HexFormat.of();
    StringBuilder out = new StringBuilder();
    for (int i = 0; i < n; i++) {
      out.append("E ").append(hex.formatHex(bytes(ee.encode(event(es, a[4], i, baseTs))))).append('\n');
      out.append("L ").append(hex.formatHex(bytes(le.encode(label(ls, a[4], i, flipAt, baseTs))))).append('\n');
    }
    System.out.print(out);
  }

  static void decode(String[] a) throws Exception {
    Map<String, BinaryMessageDecoder<GenericRecord>> decoders = new HashMap<>();
    for (int i = 1; i < a.length; i++) {
      Schema s = schema(a[i]);
      decoders.put(s.getName(), new BinaryMessageDecoder<>(GenericData.get(), s));
    }
    HexFormat hex = HexFormat.of();
    BufferedReader in = new BufferedReader(new InputStreamReader(System.in, StandardCharsets.UTF_8));
    String line;
    while ((line = in.readLine()) != null) {
      if (line.isBlank()) {
        continue;
      }
      String[] parts = line.trim().split(" ", 2);
      try {
        System.out.println(decoders.get(parts[0]).decode(hex.parseHex(parts[1])));
      } catch (Exception e) {
        System.out.println("ERROR " + e.getClass().getSimpleName() + ": " + e.getMessage());
      }
    }
  }

  static void produce(String[] a) throws Exception {
    Schema es = schema(a[2]);
    Schema ls = schema(a[3]);
    int n = Integer.parseInt(a[6]);
    int flipAt = Integer.parseInt(a[8]);
    double baseTs = Double.parseDouble(a[9]);
    BinaryMessageEncoder<GenericRecord> ee = new BinaryMessageEncoder<>(GenericData.get(), es);
    BinaryMessageEncoder<GenericRecord> le = new BinaryMessageEncoder<>(GenericData.get(), ls);
    Properties p = new Properties();
    p.put("bootstrap.servers", a[1]);
    p.put("enable.idempotence", "true");
    p.put("acks", "all");
    p.put("linger.ms", "5");
    try (KafkaProducer<String, byte[]> producer =
        new KafkaProducer<>(p, new StringSerializer(), new ByteArraySerializer())) {
      List<java.util.concurrent.Future<?>> sent = new ArrayList<>();
      for (int i = 0; i < n; i++) {
        GenericRecord e = event(es, a[7], i, baseTs);
        sent.add(producer.send(new ProducerRecord<>(a[4], e.get("entity_id").toString(), bytes(ee.encode(e)))));
        GenericRecord l = label(ls, a[7], i, flipAt, baseTs);
        sent.add(producer.send(new ProducerRecord<>(a[5], l.get("event_id").toString(), bytes(le.encode(l)))));
      }
      producer.flush();
      for (java.util.concurrent.Future<?> f : sent) {
        f.get();  // a failed delivery fails the test
      }
    }
    System.out.println("produced " + n);
  }

  static void produceRegistry(String[] a) throws Exception {
    Schema es = schema(a[3]);
    Schema ls = schema(a[4]);
    int n = Integer.parseInt(a[7]);
    int flipAt = Integer.parseInt(a[9]);
    double baseTs = Double.parseDouble(a[10]);
    Properties p = new Properties();
    p.put("bootstrap.servers", a[1]);
    p.put("enable.idempotence", "true");
    p.put("acks", "all");
    p.put("linger.ms", "5");
    // What a Confluent-world consumer reads: the id in the payload (not in Kafka headers), 4 bytes.
    Map<String, Object> serde = new HashMap<>();
    serde.put("apicurio.registry.url", a[2]);
    serde.put("apicurio.registry.auto-register", "true");
    serde.put("apicurio.registry.as-confluent", "true");
    serde.put("apicurio.registry.use-id", "contentId");
    serde.put("apicurio.registry.headers.enabled", "false");
    try (io.apicurio.registry.serde.avro.AvroKafkaSerializer<GenericRecord> values =
            new io.apicurio.registry.serde.avro.AvroKafkaSerializer<>();
        KafkaProducer<String, GenericRecord> producer =
            new KafkaProducer<>(p, new StringSerializer(), values)) {
      values.configure(serde, false);
      List<java.util.concurrent.Future<?>> sent = new ArrayList<>();
      for (int i = 0; i < n; i++) {
        GenericRecord e = event(es, a[8], i, baseTs);
        sent.add(producer.send(new ProducerRecord<>(a[5], e.get("entity_id").toString(), e)));
        GenericRecord l = label(ls, a[8], i, flipAt, baseTs);
        sent.add(producer.send(new ProducerRecord<>(a[6], l.get("event_id").toString(), l)));
      }
      producer.flush();
      for (java.util.concurrent.Future<?> f : sent) {
        f.get();
      }
    }
    System.out.println("produced " + n);
  }

  static void consume(String[] a) throws Exception {
    long deadline = System.nanoTime() + (long) (Double.parseDouble(a[2]) * 1e9);
    int count = Integer.parseInt(a[4]);
    Map<String, BinaryMessageDecoder<GenericRecord>> decoders = new HashMap<>();
    for (int i = 5; i < a.length; i++) {
      String[] pair = a[i].split("=", 2);
      decoders.put(pair[0], new BinaryMessageDecoder<>(GenericData.get(), schema(pair[1])));
    }
    Properties p = new Properties();
    p.put("bootstrap.servers", a[1]);
    p.put("group.id", a[3]);
    p.put("auto.offset.reset", "earliest");
    p.put("enable.auto.commit", "false");
    int seen = 0;
    StringBuilder out = new StringBuilder();
    try (KafkaConsumer<String, byte[]> consumer =
        new KafkaConsumer<>(p, new StringDeserializer(), new ByteArrayDeserializer())) {
      consumer.subscribe(new ArrayList<>(decoders.keySet()));
      long lastMessage = System.nanoTime();
      // At least COUNT messages, then on until the topics have been quiet for a second.
      while (System.nanoTime() < deadline && (seen < count || System.nanoTime() - lastMessage < 1_000_000_000L)) {
        for (ConsumerRecord<String, byte[]> r : consumer.poll(Duration.ofMillis(200))) {
          lastMessage = System.nanoTime();
          out.append(r.topic()).append('\t');
          for (Header h : r.headers()) {  // key=value;... (the record's Kafka headers, as text)
            out.append(h.key()).append('=').append(new String(h.value(), StandardCharsets.UTF_8)).append(';');
          }
          out.append('\t');
          try {
            out.append(decoders.get(r.topic()).decode(r.value()));
          } catch (Exception e) {
            out.append("ERROR ").append(e.getClass().getSimpleName()).append(": ").append(e.getMessage());
          }
          out.append('\n');
          seen++;
        }
      }
    }
    System.out.print(out);
  }
}
